"""The federated round loop of the ServerApp.

Flower's `Strategy.start()` returns its history only when the last round is done; we
drive the same strategy hooks (configure_train / aggregate_train / configure_evaluate /
aggregate_evaluate) ourselves so that every round is written to metrics.json as it
ends, progress is shown while it runs, and a crash keeps what was measured.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from common.config import ExperimentConfig
from common.records import new_run_dir
from fl_server.checkpoint import save_checkpoint
from fl_server.exchange import canonical_order, send_and_receive
from fl_server.loop import (
    initial_arrays,
    lora_train_of,
    make_strategy,
    recorder,
    round_row,
    round_summary,
    start_or_resume,
    strategy_state,
)
from fl_server.secagg import secure_train_round
from fl_server.split_loop import run_split
from models import get_workload
from models.seam import Workload
from privacy import central_dp
from privacy.dp import PANELS as DP_PANELS

log = logging.getLogger("fedsemcom")



def client_metrics(replies) -> dict[str, dict[str, float]]:
    """Each answering client's metrics record, by its node id (for the trackers)."""
    out = {}
    for reply in replies:
        if not reply.has_error() and "metrics" in reply.content.metric_records:
            out[str(reply.metadata.src_node_id)] = dict(reply.content.metric_records["metrics"])
    return out

def run_federated(grid: Grid, cfg: ExperimentConfig, run_dir: Path | None = None,
                  console: Console | None = None, resume: bool = False) -> dict[str, Any]:
    """Run `cfg.rounds` federated rounds; return the results dict.

    With `channel.sweep_snr_db`, the final global state is then evaluated by the
    clients at each of those fixed SNRs (results["snr_sweep"]). After every round the
    global adapters, the strategy state and the metrics are checkpointed in `run_dir`;
    `resume=True` continues from that checkpoint. With `split.mode` other than off the
    rounds are split training (fl_server.split_loop.run_split), checkpointed the same way.
    """
    if resume and run_dir is None:
        raise ValueError("resume=True needs the run_dir of the run to continue")
    if cfg.split.mode != "off":  # split training: its own loop
        return run_split(grid, cfg, run_dir, console, resume=resume)
    console = console or Console(stderr=True)
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg.output_dir, cfg.name)
    workload = get_workload(cfg.workload)
    workload.prepare(cfg)  # before round 1, e.g. the tosc teacher the clients load
    strategy = make_strategy(cfg)
    arrays = initial_arrays(cfg, lora_train_of(strategy))
    done, rows = 0, []
    if ckpt := start_or_resume(run_dir, cfg, resume):
        arrays, done, rows = ckpt.arrays["global"], ckpt.round, ckpt.metrics
    panels = {"local": DP_PANELS, "central": central_dp.PANELS}.get(cfg.privacy.dp.mode, ())
    records = recorder(run_dir, cfg, rows, extra_panels=panels)
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
                new_arrays, train_metrics, missing = None, None, []
                if cfg.strategy.secure_aggregation:  # the server sees masked updates only
                    new_arrays, train_metrics, answered, _ = secure_train_round(
                        grid, strategy, cfg, rnd, arrays, config)
                    n_replies = answered
                else:
                    messages = list(strategy.configure_train(rnd, arrays, config, grid))
                    replies, sent_to = send_and_receive(grid, messages, cfg.round_timeout_s)
                    replies, missing = _log_missing(rnd, "train", messages, sent_to, replies,
                                                    cfg.round_timeout_s)
                    answered = sum(not r.has_error() for r in replies)  # errors never count
                    n_replies = len(replies)
                    if records.tracker.active:
                        records.tracker.log_clients(rnd, "train", client_metrics(replies))
                    if answered >= cfg.min_train_clients:
                        new_arrays, train_metrics = strategy.aggregate_train(
                            rnd, canonical_order(replies))
                if answered < cfg.min_train_clients:
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
                    if records.tracker.active:
                        records.tracker.log_clients(rnd, "evaluate",
                                                    client_metrics(eval_replies))
                row = round_row(workload, rnd, train_metrics, eval_metrics, n_replies,
                                time.time() - t0)
                row["clients_missing"] = len(missing)
                if cfg.privacy.dp.mode == "central":  # one more release if aggregated
                    released = records.rounds[-1]["dp_central_releases"] if records.rounds else 0
                    row["dp_central_releases"] = released + (new_arrays is not None)
                    row["dp_central_epsilon"] = central_dp.central_epsilon(
                        cfg.privacy.dp, row["dp_central_releases"])
                records.add_round(row)
                save_checkpoint(run_dir, rnd, {"global": arrays}, strategy_state(cfg),
                                records.rounds, cfg.to_dict())
                progress.advance(task)
                progress.console.print(round_summary(workload, row, cfg.rounds), soft_wrap=True)
        if cfg.channel.sweep_snr_db and cfg.fraction_evaluate > 0:
            records.data["snr_sweep"] = _snr_sweep(grid, strategy, cfg, arrays, workload)
            for row in records.data["snr_sweep"]:
                shown = "  ".join(f"{k} {row[k]:.3f}" for k in workload.EVAL_METRICS if k in row)
                console.print(f"final state at SNR {row['snr_db']:g} dB: {shown}", soft_wrap=True)
        np.savez(run_dir / "global_adapters.npz", **{k: v.numpy() for k, v in arrays.items()})
        records.finish("completed")
    except BaseException as err:
        records.finish("failed", error=f"{type(err).__name__}: {err}")
        raise
    return records.data


def _snr_sweep(grid: Grid, strategy, cfg: ExperimentConfig, arrays: ArrayRecord,
               workload: Workload) -> list[dict[str, Any]]:
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
        for k in workload.EVAL_METRICS:
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
