"""Ray-backed simulation of many virtual clients (Flower's simulation runtime), on this
machine or on an existing Ray cluster (`simulation.ray_address`, or RAY_ADDRESS). The
ClientApp is the one `flwr run` and the deployment engine use."""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import ray
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
from simulation.warm import HOOK, actor_env


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


def start_ray(cfg: ExperimentConfig, init_args: dict[str, Any]) -> bool:
    """Start Ray (or join the cluster) for the run, so that every client actor starts
    warm (simulation/warm.py); False if Ray already runs in this process, which Flower
    then uses as it is.

    Flower's backend initialises Ray itself unless it already runs, and passes only
    `PYTHONPATH` as the runtime environment (flwr 1.41 `RayBackend.init_ray`, which
    also refuses a `runtime_env` among the init arguments); this does the same, with
    the warm-up hook and its settings added."""
    if ray.is_initialized():
        return False
    if "address" not in init_args:
        # Ray starts idle workers for a new driver ahead of time; the client actors never
        # use them (an actor with the job's warm-up hook starts its own worker, checked
        # with ray 2.55), and on a small machine their start-up takes CPU from the
        # actors' in round 1. Read by the local raylet from its environment.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        os.environ.setdefault("RAY_enable_worker_prestart", "0")
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath  # as Flower's: Ray's processes inherit it
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath, **actor_env(cfg)},
                          "worker_process_setup_hook": HOOK}, **init_args)
    return True


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

    backend = backend_config(cfg)
    started = start_ray(cfg, backend["init_args"])
    try:
        with dispatch_interval(cfg.simulation.dispatch_interval_s):
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=cfg.num_clients,
                backend_name=cfg.simulation.backend,
                backend_config=backend,
            )
    finally:
        if started and ray.is_initialized():  # Flower shuts it down unless it failed early
            ray.shutdown()
    if not results:
        raise RuntimeError("the simulation ended without results; see the log above")
    return results
