"""Ray-backed simulation of many virtual clients (Flower's simulation runtime), on this
machine or on an existing Ray cluster (`simulation.ray_address`, or RAY_ADDRESS). The
ClientApp is the one `flwr run` and the deployment engine use."""

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
from simulation.dispatch import dispatch_interval


def ray_address(cfg: ExperimentConfig) -> str | None:
    """The Ray cluster to join: `simulation.ray_address`, else RAY_ADDRESS, else None
    (a Ray instance of this machine, started and stopped with the run)."""
    return cfg.simulation.ray_address or os.environ.get("RAY_ADDRESS") or None


def backend_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Ray's init arguments and each client's resources. Flower sizes the actor pool
    from them: on each Ray node, as many actors as its CPUs (and GPUs) hold clients."""
    per_client = cfg.simulation.num_cpus_per_client
    resources: dict[str, float] = {"num_cpus": per_client}
    if cfg.simulation.num_gpus_per_client > 0:
        resources["num_gpus"] = cfg.simulation.num_gpus_per_client
    address = ray_address(cfg)
    if address is not None:
        # Joining a cluster: its nodes bring their own CPUs and GPUs (Ray refuses
        # num_cpus here), and Flower refuses a client no node can hold.
        return {"client_resources": resources,
                "init_args": {"address": address, "include_dashboard": False,
                              "log_to_driver": True}}
    cores = os.cpu_count() or 1
    if per_client > cores:
        raise ConfigError(
            f"config key 'simulation.num_cpus_per_client': got {per_client}, but this "
            f"machine has {cores} cores; use a value <= {cores} so Ray can start actors"
        )
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

    with dispatch_interval(cfg.simulation.dispatch_interval_s):
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
