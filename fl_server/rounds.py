"""The federated round loop of the ServerApp.

Flower's `Strategy.start()` returns its history only when the last round is done; we
drive the same strategy hooks (configure_train / aggregate_train / configure_evaluate /
aggregate_evaluate) ourselves so that every round is written to metrics.json as it
ends, progress is shown while it runs, and a crash keeps what was measured.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fl_server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fl_server.exchange import canonical_order, send_and_receive
from models import get_workload
from simulation.config import ConfigError, ExperimentConfig
from simulation.report import RunRecorder, new_run_dir
from strategies import build_strategy

log = logging.getLogger("fedsemcom")

# Metrics copied from the aggregated records into each round's row.
TRAIN_KEYS = ("train_loss", "symbols_per_example", "bytes_up", "bytes_down",
              "clients_accepted", "clients_rejected",
              "loss_task", "loss_ib", "loss_kd", "loss_feature",  # tosc (distillation)
              "teacher_seconds", "teacher_store_bytes")
EVAL_KEYS = ("accuracy", "vqa_accuracy", "bleu", "psnr", "majority_class_share")
# Keys that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("rounds", "round_timeout_s", "output_dir", "client_state_dir")


def make_strategy(cfg: ExperimentConfig):
    min_eval = 0 if cfg.fraction_evaluate == 0 else cfg.min_train_clients
    return build_strategy(
        cfg.strategy.name,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_clients,
        min_evaluate_nodes=min_eval,
        min_available_nodes=cfg.min_train_clients,
        target_rank=cfg.strategy.svd_rank,
        lora_alpha=cfg.lora.alpha,
        proximal_mu=cfg.strategy.proximal_mu,
        max_update_bytes=cfg.strategy.max_update_bytes,
        trim_beta=cfg.strategy.trim_beta,
        num_malicious_nodes=cfg.strategy.krum_malicious,
    )


def initial_arrays(cfg: ExperimentConfig, lora_train: str) -> ArrayRecord:
    """The global adapters at round 0: every party builds the same seeded model."""
    workload = get_workload(cfg.workload)
    shared = workload.shared_state(workload.build(cfg, "cpu"), lora_train)
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


def run_federated(grid: Grid, cfg: ExperimentConfig, run_dir: Path | None = None,
                  console: Console | None = None, resume: bool = False) -> dict[str, Any]:
    """Run `cfg.rounds` federated rounds; return the results dict.

    With `channel.sweep_snr_db`, the final global state is then evaluated by the
    clients at each of those fixed SNRs (results["snr_sweep"]). After every round the
    global adapters, the strategy state and the metrics are checkpointed in `run_dir`;
    `resume=True` continues from that checkpoint. With `split.mode` other than off the
    rounds are split training (fl_server.split.run_split), checkpointed the same way.
    """
    if resume and run_dir is None:
        raise ValueError("resume=True needs the run_dir of the run to continue")
    if cfg.split.mode != "off":
        from fl_server.split import run_split  # split training: its own loop

        return run_split(grid, cfg, run_dir, console, resume=resume)
    console = console or Console(stderr=True)
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg.output_dir, cfg.name)
    prepare = getattr(get_workload(cfg.workload), "prepare", None)
    if prepare is not None:
        prepare(cfg)  # workload set-up before round 1 (tosc: its teacher)
    strategy = make_strategy(cfg)
    arrays = initial_arrays(cfg, strategy.lora_train)
    done, rows = 0, []
    if ckpt := start_or_resume(run_dir, cfg, resume):
        arrays, done, rows = ckpt.arrays["global"], ckpt.round, ckpt.metrics
    recorder = RunRecorder(run_dir, cfg.to_dict(), rounds=rows)
    # A stable name for this run that survives resumption: clients key their own
    # saved state by it (see fl_client.node).
    run_key = run_dir.name
    resumed = f", resumed after round {done}" if resume else ""
    console.print(f"[bold]fedsemcom[/] {cfg.name}: {cfg.rounds} rounds, {cfg.num_clients} "
                  f"clients, strategy {cfg.strategy.name}, results in {run_dir}{resumed}",
                  soft_wrap=True)
    progress = Progress(TextColumn("[bold blue]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} rounds"),
                        TimeElapsedColumn(), console=console)
    try:
        with progress:
            task = progress.add_task("federated rounds", total=cfg.rounds, completed=done)
            for rnd in range(done + 1, cfg.rounds + 1):
                t0 = time.time()
                config = ConfigRecord({"experiment": cfg.to_json(), "run-key": run_key})
                messages = list(strategy.configure_train(rnd, arrays, config, grid))
                replies, sent_to = send_and_receive(grid, messages, cfg.round_timeout_s)
                replies, missing = _log_missing(rnd, "train", messages, sent_to, replies,
                                                cfg.round_timeout_s)
                answered = sum(not r.has_error() for r in replies)  # errors never count
                new_arrays, train_metrics = None, None
                if answered >= cfg.min_train_clients:
                    new_arrays, train_metrics = strategy.aggregate_train(
                        rnd, canonical_order(replies))
                else:
                    log.warning("round %d: %d client(s) answered, fewer than min_train_clients="
                                "%d; the round's updates are not aggregated", rnd, answered,
                                cfg.min_train_clients)
                if new_arrays is not None:
                    arrays = new_arrays
                else:
                    log.warning("round %d: no valid update; keeping the global adapters", rnd)
                eval_metrics = None
                if cfg.fraction_evaluate > 0:
                    config = ConfigRecord({"experiment": cfg.to_json(), "run-key": run_key})
                    messages = list(strategy.configure_evaluate(rnd, arrays, config, grid))
                    eval_replies, sent_to = send_and_receive(grid, messages, cfg.round_timeout_s)
                    eval_replies, _ = _log_missing(rnd, "evaluate", messages, sent_to,
                                                   eval_replies, cfg.round_timeout_s)
                    eval_metrics = strategy.aggregate_evaluate(rnd, canonical_order(eval_replies))
                row = _round_row(rnd, train_metrics, eval_metrics, len(replies), time.time() - t0)
                row["clients_missing"] = len(missing)
                recorder.add_round(row)
                save_checkpoint(run_dir, rnd, {"global": arrays}, strategy_state(cfg),
                                recorder.rounds, cfg.to_dict())
                progress.advance(task)
                progress.console.print(_summary(row, cfg.rounds), soft_wrap=True)
        if cfg.channel.sweep_snr_db and cfg.fraction_evaluate > 0:
            recorder.data["snr_sweep"] = _snr_sweep(grid, strategy, cfg, arrays)
            for row in recorder.data["snr_sweep"]:
                shown = "  ".join(f"{k} {row[k]:.3f}" for k in EVAL_KEYS if k in row)
                console.print(f"final state at SNR {row['snr_db']:g} dB: {shown}", soft_wrap=True)
        np.savez(run_dir / "global_adapters.npz", **{k: v.numpy() for k, v in arrays.items()})
        recorder.finish("completed")
    except BaseException as err:
        recorder.finish("failed", error=f"{type(err).__name__}: {err}")
        raise
    return recorder.data


def _snr_sweep(grid: Grid, strategy, cfg: ExperimentConfig, arrays: ArrayRecord
               ) -> list[dict[str, Any]]:
    """Evaluate the final global state at each fixed SNR of channel.sweep_snr_db."""
    rows = []
    for snr in cfg.channel.sweep_snr_db:
        channel = dataclasses.replace(cfg.channel, snr_db=snr, snr_range_db=None)
        at_snr = dataclasses.replace(cfg, channel=channel)
        replies = list(grid.send_and_receive(
            strategy.configure_evaluate(cfg.rounds, arrays,
                                        ConfigRecord({"experiment": at_snr.to_json()}), grid),
            timeout=cfg.round_timeout_s,
        ))
        metrics = strategy.aggregate_evaluate(cfg.rounds, canonical_order(replies))
        row: dict[str, Any] = {"snr_db": snr}
        for k in EVAL_KEYS:
            if metrics is not None and k in metrics:
                row[k] = float(metrics[k])
        rows.append(row)
    return rows


def _log_missing(rnd: int, stage: str, messages: list, sent_to: dict[str, int],
                 replies: list, timeout: float) -> tuple[list, list[int]]:
    """Log the nodes that were sent a message but did not answer: no reply before
    the timeout, or an error reply that the SuperLink wrote in their place (e.g.
    "Node Unavailable" after missed heartbeats). Return the clients' own replies
    (the SuperLink's are logged here under the right node, not passed on) and the
    nodes missing."""
    answered, own = set(), []
    for r in replies:
        node = sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
        if r.has_error() and r.metadata.src_node_id != node:  # written by the SuperLink
            log.warning("round %d (%s): node %s is unavailable: %s", rnd, stage, node,
                        r.error.reason)
        else:
            answered.add(node)
            own.append(r)
    missing = sorted({m.metadata.dst_node_id for m in messages} - answered)
    if missing:
        log.warning("round %d (%s): no reply from node(s) %s (unavailable, or silent for "
                    "%.0f s); going on with the %d that replied", rnd, stage,
                    ", ".join(map(str, missing)), timeout, len(answered))
    return own, missing


def _round_row(rnd: int, train_m, eval_m, n_replies: int, seconds: float) -> dict[str, Any]:
    row: dict[str, Any] = {"round": rnd, "clients_replied": n_replies, "seconds": round(seconds, 2)}
    for keys, record in ((TRAIN_KEYS, train_m), (EVAL_KEYS, eval_m)):
        for k in keys:
            if record is not None and k in record:
                row[k] = float(record[k])
    if eval_m is not None and "loss" in eval_m:
        row["eval_loss"] = float(eval_m["loss"])
    return row


def _summary(row: dict[str, Any], rounds: int) -> str:
    parts = [f"round {row['round']}/{rounds}"]
    for key, fmt in (("train_loss", "loss {:.3f}"), ("accuracy", "acc {:.3f}"),
                     ("vqa_accuracy", "vqa {:.3f}"), ("bleu", "bleu {:.3f}"),
                     ("psnr", "psnr {:.1f} dB"), ("bytes_up", "up {:.0f} B")):
        if key in row:
            parts.append(fmt.format(row[key]))
    parts.append(f"{row['seconds']:.1f} s")
    return "  ".join(parts)
