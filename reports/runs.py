"""Run folders, as the drivers read them: start a simulation run, read a finished one,
and put a client back together as it ended the run.

A run folder (`python -m simulation` writes it) holds `metrics.json` (the config and
one row per round), `global_adapters.npz` (the final global shared state) and, for
the simulation's virtual nodes, `client-state/` (each client's private tensors after
the rounds it trained; see models/client_state.py). A SuperNode keeps its private
tensors in its own `state-dir`; pass that folder as `state_dir`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import ExperimentConfig, config_from_dict
from models import get_workload
from models.client_state import (
    client_experiment,
    client_lora_rank,
    load_local_parameters,
    read_state_file,
    saved_rounds,
)
from privacy.dp import HISTORY_KEY

GLOBAL_STATE = "global_adapters.npz"
SIMULATION_STATE_DIR = "client-state"  # inside the run folder (python -m simulation)


class RunFolderError(ValueError):
    """A run folder lacks what was asked of it; the message names the folder and the fix."""


def simulation_run(config: str, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """The results of `python -m simulation --config CONFIG --run-dir RUN_DIR OVERRIDES`,
    run in a fresh process (Ray starts clean each time); a completed run already in
    `run_dir` is reused (delete it to run again). The reports compare such runs."""
    metrics = Path(run_dir) / "metrics.json"
    if metrics.is_file() and json.loads(metrics.read_text()).get("status") == "completed":
        print(f"reusing the completed run in {run_dir}", flush=True)
        return json.loads(metrics.read_text())
    cmd = [sys.executable, "-m", "simulation", "--config", config, "--run-dir", str(run_dir),
           *overrides]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(metrics.read_text())


def finished_run(run_dir: str | Path) -> tuple[ExperimentConfig, dict[str, np.ndarray]]:
    """The config and the final global shared state of a completed run."""
    run_dir = Path(run_dir)
    metrics, final = run_dir / "metrics.json", run_dir / GLOBAL_STATE
    if not metrics.is_file():
        raise RunFolderError(f"--run {run_dir}: no metrics.json there; give the folder of a "
                             "run (python -m simulation prints it)")
    record = json.loads(metrics.read_text())
    if record.get("status") != "completed" or not final.is_file():
        model = "present" if final.is_file() else "missing"
        raise RunFolderError(f"--run {run_dir}: the run did not finish (status "
                             f"{record.get('status')!r}, final model {model}); resume it to "
                             "the end (python -m simulation --resume) or use a finished one")
    return config_from_dict(record["config"]), read_state_file(final)


def saved_client_state(cfg: ExperimentConfig, run_dir: str | Path, partition_id: int,
                       state_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """Partition `partition_id`'s private tensors after the last round it trained (and
    its DP accountant's history, under privacy.dp.HISTORY_KEY, if it ran DP-SGD), from
    `state_dir` (the node's `state-dir`), else from where the run's clients kept them."""
    folder = client_state_folder(cfg, run_dir, partition_id, state_dir)
    return read_state_file(saved_rounds(folder)[-1][1])


def client_state_folder(cfg: ExperimentConfig, run_dir: str | Path, partition_id: int,
                        state_dir: str | Path | None = None) -> Path:
    """The folder of partition `partition_id`'s last saved round (its private state and
    data-indices.json), found as `saved_client_state` finds it."""
    run_dir = Path(run_dir)
    if state_dir is not None:
        roots = {Path(state_dir)}
    else:
        roots = {Path(cfg.client_state_dir)} if cfg.client_state_dir else set()
        roots.add(run_dir / SIMULATION_STATE_DIR)
    # A node's folder holds <run key>/partition-<id>/; the run key is the folder's name.
    files = [f for root in roots if root.is_dir()
             for folder in root.glob(f"**/{run_dir.name}/partition-{partition_id}")
             for f in saved_rounds(folder)]
    if not files:
        raise RunFolderError(f"partition {partition_id}: no saved private state under "
                             f"{' or '.join(map(str, sorted(roots)))}; use a run whose "
                             "clients kept their state there (python -m simulation does), or "
                             "name the nodes' folder with --state-dir")
    return max(files)[1].parent


def restore_client(cfg: ExperimentConfig, run_dir: str | Path, partition_id: int,
                   device: torch.device | str = "cpu",
                   state_dir: str | Path | None = None) -> torch.nn.Module:
    """Client `partition_id` as it ended the run, in eval mode: its private tensors
    (parameters and the running statistics of its batch-norm layers) from its last
    saved round, with the final global shared state on top, as the ClientApp
    assembles a client for a message (fl_client/client_app.py)."""
    _, global_state = finished_run(run_dir)
    cfg = client_experiment(cfg, partition_id)  # its transmitter budget, if any
    saved = saved_client_state(cfg, run_dir, partition_id, state_dir)
    saved.pop(HISTORY_KEY, None)
    workload = get_workload(cfg.workload)
    model = workload.build(cfg, device, lora_rank=client_lora_rank(cfg, partition_id))
    load_local_parameters(model, saved)
    workload.load_shared_state(model, global_state)
    return model.eval()
