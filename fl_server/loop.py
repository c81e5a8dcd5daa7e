"""What both round loops share: the federated loop (rounds.py) and the split loop
(split.py) build the strategy, start or resume a run, and record each round the same
way. Both import this module; it imports neither."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from common.config import ConfigError, ExperimentConfig
from common.records import Panel, RunRecorder
from fl_server.checkpoint import Checkpoint, load_checkpoint
from models import get_workload
from models.seam import InitialSharedState, Workload
from privacy import central_dp
from strategies import build_strategy

# The engine's own metrics, copied from the aggregated train records into each round's
# row beside the workload's TRAIN_METRICS / EVAL_METRICS (its workload module names them).
ENGINE_TRAIN_METRICS = ("train_loss", "bytes_up", "bytes_down", "clients_accepted",
                        "clients_rejected", "dp_epsilon_max", "dp_epsilon_mean",
                        "dp_noise_multiplier", "secagg_seconds", "secagg_exchanges")
ENGINE_PANELS = (Panel("train loss", ("train_loss",)),
                 Panel("bytes per client per round", ("bytes_up", "bytes_down")))
# Keys that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("rounds", "round_timeout_s", "output_dir", "client_state_dir", "tracking",
                     "tracking_uri")


def make_strategy(cfg: ExperimentConfig):
    """The configured strategy; with central DP inside Flower's DP wrapper."""
    central = cfg.privacy.dp.mode == "central"
    min_eval = 0 if cfg.fraction_evaluate == 0 else cfg.min_train_clients
    strategy = build_strategy(
        cfg.strategy.name,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_clients,
        min_evaluate_nodes=min_eval,
        # Central DP accounts every client in every round: wait for all of them.
        min_available_nodes=cfg.num_clients if central else cfg.min_train_clients,
        target_rank=cfg.strategy.svd_rank,
        lora_alpha=cfg.lora.alpha,
        proximal_mu=cfg.strategy.proximal_mu,
        max_update_bytes=cfg.strategy.max_update_bytes,
        trim_beta=cfg.strategy.trim_beta,
        num_malicious_nodes=cfg.strategy.krum_malicious,
        **({"weighted_by_key": central_dp.UNIFORM_WEIGHT} if central else {}),
    )
    return central_dp.wrap(strategy, cfg) if central else strategy


def lora_train_of(strategy) -> str:
    """Which LoRA factors the clients train ("ab" or "b"), through a DP wrapper."""
    return getattr(strategy, "strategy", strategy).lora_train


def initial_arrays(cfg: ExperimentConfig, lora_train: str) -> ArrayRecord:
    """The global adapters at round 0: every party builds the same seeded model, unless
    the workload starts its shared weights from a file the server made in `prepare`
    (`initial_shared_state(cfg)`, taco's pre-trained codec): clients then never read
    that file, they receive its weights in round 1."""
    workload = get_workload(cfg.workload)
    shared = (workload.initial_shared_state(cfg) if isinstance(workload, InitialSharedState)
              else workload.shared_state(workload.build(cfg, "cpu"), lora_train))
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in shared.items()})


def strategy_state(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the server needs, beside the arrays, to continue exactly: Flower's
    FedAvg family keeps nothing between rounds except the `random` state its node
    sampling draws from."""
    version, internal, gauss = random.getstate()
    return {"name": cfg.strategy.name, "python_random": [version, list(internal), gauss]}


def restore_strategy_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))


def check_resumable(saved: dict[str, Any], cfg: ExperimentConfig) -> None:
    """Refuse to resume with a config other than the checkpoint's (except RESUMABLE_CHANGES)."""
    now = cfg.to_dict()
    diff = sorted(k for k in set(saved) | set(now)
                  if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if diff:
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in diff)
        raise ConfigError(
            f"cannot resume: the config differs from the checkpoint's in {shown}. Resume "
            f"with the checkpoint's config (the 'config' of its metrics.json; only "
            f"{', '.join(RESUMABLE_CHANGES)} may change) or start a new run")


def start_or_resume(run_dir: Path, cfg: ExperimentConfig, resume: bool) -> Checkpoint | None:
    """Seed the strategy state (Flower's node sampling draws from Python's `random`);
    when resuming, return the checkpoint, checked against `cfg`, and restore the
    strategy state it saved."""
    random.seed(cfg.seed)
    if not resume:
        return None
    ckpt = load_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(
            f"no checkpoint in {run_dir}: resume needs the run folder of an earlier "
            "run (it holds checkpoint.npz); leave resume out to start a new run")
    check_resumable(ckpt.config, cfg)
    restore_strategy_state(ckpt.strategy_state)
    return ckpt


def recorder(run_dir: Path, cfg: ExperimentConfig, rows: list[dict[str, Any]],
             extra_panels: tuple[Panel, ...] = ()) -> RunRecorder:
    """metrics.json and metrics.png of the run: the engine's plots, the workload's and
    any audit's."""
    panels = ENGINE_PANELS + tuple(get_workload(cfg.workload).PANELS) + extra_panels
    return RunRecorder(run_dir, cfg.to_dict(), rounds=rows, panels=panels)


def round_row(workload: Workload, rnd: int, train_m, eval_m, n_replies: int,
              seconds: float) -> dict[str, Any]:
    """A round's row of metrics.json: the engine's metrics and the workload's."""
    row: dict[str, Any] = {"round": rnd, "clients_replied": n_replies, "seconds": round(seconds, 2)}
    train_keys = ENGINE_TRAIN_METRICS + tuple(workload.TRAIN_METRICS)
    for keys, record in ((train_keys, train_m), (workload.EVAL_METRICS, eval_m)):
        for k in keys:
            if record is not None and k in record:
                row[k] = float(record[k])
    if eval_m is not None and "loss" in eval_m:
        row["eval_loss"] = float(eval_m["loss"])
    return row


def round_summary(workload: Workload, row: dict[str, Any], rounds: int) -> str:
    """The one line printed when a round ends."""
    formats = {"train_loss": "loss {:.3f}", **workload.SUMMARY, "bytes_up": "up {:.0f} B",
               "dp_epsilon_max": "eps {:.2f}", "dp_central_epsilon": "eps {:.2f}"}
    parts = [f"round {row['round']}/{rounds}"]
    parts += [fmt.format(row[key]) for key, fmt in formats.items() if key in row]
    parts.append(f"{row['seconds']:.1f} s")
    return "  ".join(parts)
