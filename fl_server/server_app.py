"""The ServerApp. `flwr run .` passes `config` (a YAML experiment file), `overrides`
("key=value key=value") and `resume` (a run folder to continue from its checkpoint,
"" for a new run) from [tool.flwr.app.config] / --run-config."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import load_config
from fl_server.fast_pull import shorten_reply_pulls
from fl_server.rounds import run_federated

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    shorten_reply_pulls()  # only on a SuperLink started with `deploy.launch --fast`
    cfg = load_config(str(context.run_config["config"]),
                      str(context.run_config.get("overrides", "")))
    resume = str(context.run_config.get("resume", ""))
    run_federated(grid, cfg, Path(resume) if resume else None, resume=bool(resume))
