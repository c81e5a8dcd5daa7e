"""Ray-backed simulation of many virtual clients on one machine (Flower's simulation
runtime). The ClientApp is the one `flwr run` and the deployment engine use."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from common.config import ConfigError, ExperimentConfig
from common.records import new_run_dir
from fl_client.client_app import NodeApp
from fl_client.client_app import app as client_app
from fl_client.trust import node_config_of
from fl_server.rounds import run_federated


def backend_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Size Ray's actor pool: clients share the cores (num_cpus above them empties it)."""
    cores = os.cpu_count() or 1
    per_client = cfg.simulation.num_cpus_per_client
    if per_client > cores:
        raise ConfigError(
            f"config key 'simulation.num_cpus_per_client': got {per_client}, but this "
            f"machine has {cores} cores; use a value <= {cores} so Ray can start actors"
        )
    resources: dict[str, float] = {"num_cpus": per_client}
    if cfg.simulation.num_gpus_per_client > 0:
        resources["num_gpus"] = cfg.simulation.num_gpus_per_client
    return {
        "client_resources": resources,
        "init_args": {"num_cpus": cores, "include_dashboard": False, "log_to_driver": True},
    }


def simulate(cfg: ExperimentConfig, run_dir: Path | None = None, resume: bool = False,
             client_app: ClientApp = client_app) -> dict[str, Any]:
    """Run the experiment with `cfg.num_clients` virtual SuperNodes; return results.

    `resume=True` continues the run in `run_dir` from its last checkpoint.
    `client_app` defaults to the project's ClientApp (tests pass one with extra mods).
    """
    if resume and run_dir is None:
        raise ConfigError("--resume needs the run folder to continue, e.g. --resume runs/NAME")
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg.output_dir, cfg.name)
    if cfg.client_state_dir is None:
        # All virtual clients share this machine: keep their private tensors in the
        # run folder so that --resume continues them exactly.
        cfg = dataclasses.replace(cfg, client_state_dir=str(run_dir / "client-state"))
    if isinstance(client_app, NodeApp):
        # The virtual nodes are the experimenter's own, and Flower's simulation gives
        # them no node config: their paths and device are the experiment's.
        client_app = copy.copy(client_app)
        client_app.node_defaults = {**node_config_of(cfg), **client_app.node_defaults}
    results: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        results.update(run_federated(grid, cfg, run_dir, resume=resume))

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.num_clients,
        backend_name=cfg.simulation.backend,
        backend_config=backend_config(cfg),
    )
    if not results:
        raise RuntimeError("the simulation ended without results; see the log above")
    return results
