"""The ClientApp: Flower message handlers around a workload.

The experiment config arrives from the server with every message (one source of
truth, the same on the simulation and the deployment engine). Node-specific facts come
from the SuperNode's node config: `partition-id`, `num-partitions` and optionally
`device`, `data-root` (the node's local dataset folder) and `state-dir` (where it
keeps its private tensors between rounds). The client's trainable tensors persist
between rounds in `context.state`, which stays on the node; the server's shared state
is loaded on top of them. So what is private (task decoders, modality encoders, the
JSCC) is simply whatever the workload's `shared_state` does not send.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_client import split
from fl_client.node import PRIVATE_STATE, partition
from models import get_workload, resolve_device
from simulation.config import ExperimentConfig, config_from_dict
from simulation.data import load_partition

log = logging.getLogger("fedsemcom")


def experiment_from_message(msg: Message) -> ExperimentConfig:
    return config_from_dict(json.loads(str(msg.content["config"]["experiment"])))


def client_lora_rank(cfg: ExperimentConfig, partition_id: int) -> int:
    """Heterogeneous ranks (svd_lora) are assigned round-robin over partitions."""
    ranks = cfg.lora.client_ranks
    return ranks[partition_id % len(ranks)] if ranks else cfg.lora.rank


def local_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors this node keeps between rounds: every trainable parameter."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def saved_state_file(cfg: ExperimentConfig, msg: Message, context: Context, pid: int,
                     server_round: int) -> Path | None:
    """Where this node keeps its private tensors after `server_round`, or None.

    Flower gives every run a fresh `context.state`, so a resumed run (a new Flower
    run) finds its private tensors here: on the node's own disk, never in a message.
    """
    state_dir = context.node_config.get("state-dir", cfg.client_state_dir)
    run_key = str(msg.content["config"].get("run-key", ""))
    if not state_dir or not run_key:
        return None
    return Path(str(state_dir)) / run_key / f"partition-{pid}" / f"round-{server_round}.npz"


def _load_saved_state(msg: Message, context: Context, cfg: ExperimentConfig, pid: int):
    """The private tensors this node saved after the last round it trained before
    this one (with partial participation that need not be the previous round)."""
    server_round = int(msg.content["config"].get("server-round", 0))
    path = saved_state_file(cfg, msg, context, pid, server_round)
    earlier = [] if path is None else [
        (r, p) for p in path.parent.glob("round-*.npz")
        if (r := _round_of(p)) < server_round]
    if earlier:
        with np.load(max(earlier)[1], allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if server_round > 1:
        log.warning("partition %d: no saved private state before round %d (%s); the "
                    "private modules start from their initial weights", pid, server_round,
                    path.parent if path else "no client_state_dir / node config state-dir")
    return None


def _round_of(path: Path) -> int:
    return int(path.stem.split("-")[1])


def _setup(msg: Message, context: Context):
    cfg = experiment_from_message(msg)
    if "data-root" in context.node_config:  # this node's own copy of the dataset
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, root=str(context.node_config["data-root"])))
    pid, n = partition(context)
    device = resolve_device(str(context.node_config.get("device", cfg.device)))
    workload = get_workload(cfg.workload)
    model = workload.build(cfg, device, lora_rank=client_lora_rank(cfg, pid))
    if PRIVATE_STATE in context.state.array_records:
        saved = {k: v.numpy() for k, v in context.state.array_records[PRIVATE_STATE].items()}
    else:
        saved = _load_saved_state(msg, context, cfg, pid)
    if saved is not None:
        params = local_parameters(model)
        with torch.no_grad():
            for name, arr in saved.items():
                params[name].copy_(torch.from_numpy(arr))
    arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    workload.load_shared_state(model, arrays)  # the global state wins over the local copy
    train_ds, test_ds = load_partition(cfg.data, pid, n, cfg.model.caption_len)
    return cfg, pid, workload, model, train_ds, test_ds


def _save_private(model: torch.nn.Module, context: Context, path: Path | None) -> None:
    params = {n: p.detach().cpu().numpy() for n, p in local_parameters(model).items()}
    context.state[PRIVATE_STATE] = ArrayRecord({n: Array(a) for n, a in params.items()})
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **params)
    os.replace(tmp, path)  # a crash mid-write leaves the older rounds intact
    # Keep the two newest: a server that crashed after this round's training but
    # before its checkpoint resumes from this node's state before this round.
    for old in sorted(path.parent.glob("round-*.npz"), key=_round_of)[:-2]:
        old.unlink()


def _metric_record(metrics: dict[str, float]) -> MetricRecord:
    # MetricRecord wants plain Python numbers.
    return MetricRecord({k: (int(v) if k == "num-examples" else float(v)) for k, v in metrics.items()})


def train(msg: Message, context: Context) -> Message:
    cfg, pid, workload, model, train_ds, _ = _setup(msg, context)
    lora_train = str(msg.content["config"].get("lora-train", "ab"))
    server_round = int(msg.content["config"].get("server-round", 0))
    metrics = workload.train_local(
        model, train_ds, cfg, lora_train=lora_train, seed=cfg.seed * 100_003 + server_round * 1009 + pid
    )
    _save_private(model, context, saved_state_file(cfg, msg, context, pid, server_round))
    shared = workload.shared_state(model, lora_train)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in shared.items()}),
        "metrics": _metric_record(metrics),
    })
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    cfg, _, workload, model, _, test_ds = _setup(msg, context)
    metrics = workload.evaluate(model, test_ds, cfg)
    return Message(content=RecordDict({"metrics": _metric_record(metrics)}), reply_to=msg)


def make_app(mods: list | None = None) -> ClientApp:
    """The ClientApp with every handler; `mods` wrap each call (Flower client mods)."""
    client = ClientApp(mods=mods or [])
    client.train()(train)
    client.evaluate()(evaluate)
    # U-shaped split training (fl_client/split.py): "train.split_begin" and so on.
    client.train("split_begin")(split.begin)
    client.train("split_output")(split.output)
    client.train("split_backward")(split.backward)
    client.evaluate("split_forward")(split.eval_forward)
    client.evaluate("split_score")(split.eval_score)
    return client


app = make_app()
