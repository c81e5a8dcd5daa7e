"""The ServerApp. `flwr run .` passes `config` (a YAML experiment file) and
`overrides` ("key=value key=value") from [tool.flwr.app.config] / --run-config."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_server.rounds import run_federated
from simulation.config import load_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_config(str(context.run_config["config"]),
                      str(context.run_config.get("overrides", "")))
    run_federated(grid, cfg)
