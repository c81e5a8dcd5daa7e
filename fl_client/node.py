"""What a node knows about itself and keeps between messages and between runs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from flwr.app import Context, Message

from common.config import ExperimentConfig
from fl_client import trust
from models.client_state import (
    DATA_INDICES_FILE,
    data_record,
    partition_folder,
    read_state_file,
    round_file,
    saved_rounds,
)

log = logging.getLogger("fedsemcom")

# The node-local record of every tensor the client trains (task decoders, modality
# encoders, JSCC, its copy of the adapters). It lives in context.state and never
# enters a reply.
PRIVATE_STATE = "local-parameters"


def partition(context: Context) -> tuple[int, int]:
    """(partition id, number of partitions) from the SuperNode's node config."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise KeyError(
            f"node config lacks {err}; start the SuperNode with "
            "--node-config 'partition-id=K num-partitions=N'"
        ) from None


def saved_state_file(cfg: ExperimentConfig, msg: Message, context: Context, pid: int,
                     server_round: int) -> Path | None:
    """Where this node keeps its private tensors after `server_round`, or None.

    Flower gives every run a fresh `context.state`, so a resumed run (a new Flower
    run) finds its private tensors here: on the node's own disk, never in a message.
    The folder is the node's (`cfg.client_state_dir` holds the node config `state-dir`,
    see fl_client.trust); the server only names the run ("run-key"), which must be one
    safe path component, and the file must resolve inside that folder.
    """
    state_dir = cfg.client_state_dir
    key = trust.run_key(msg)
    if not state_dir or not key:
        return None
    path = round_file(partition_folder(state_dir, key, pid), server_round)
    return trust.inside(path, Path(state_dir), f"run-key={key!r}")


def load_saved_state(msg: Message, context: Context, cfg: ExperimentConfig,
                     pid: int) -> dict[str, np.ndarray] | None:
    """The private tensors this node saved after the last round it trained before
    this one (with partial participation that need not be the previous round)."""
    server_round = trust.server_round(msg)
    path = saved_state_file(cfg, msg, context, pid, server_round)
    earlier = [] if path is None else [
        (r, p) for r, p in saved_rounds(path.parent) if r < server_round]
    if earlier:
        return read_state_file(earlier[-1][1])
    if server_round > 1:
        log.warning("partition %d: no saved private state before round %d (%s); the "
                    "private modules start from their initial weights", pid, server_round,
                    path.parent if path else "no node config state-dir")
    return None


def save_state_file(params: dict[str, np.ndarray], path: Path | None) -> None:
    """Write the private tensors of a finished round to `path` (nothing if None)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **params)
    os.replace(tmp, path)  # a crash mid-write leaves the older rounds intact
    # Keep the two newest: a server that crashed after this round's training but
    # before its checkpoint resumes from this node's state before this round.
    for _, old in saved_rounds(path.parent)[:-2]:
        old.unlink()


_recorded: set[Path] = set()


def record_data_indices(cfg: ExperimentConfig, msg: Message, context: Context, pid: int,
                        train_ds, test_ds) -> None:
    """Write, once per run, which examples of its source this node trains on and which
    it holds out (`.indices` of its datasets, common/data), beside its saved rounds: a
    membership audit's members and non-members (reports/membership.py). Indices only,
    on the node's own disk; nothing here enters a reply."""
    path = saved_state_file(cfg, msg, context, pid, 0)
    if path is None:
        return
    path = path.parent / DATA_INDICES_FILE
    if path in _recorded or path.is_file():
        _recorded.add(path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data_record(cfg, train_ds, test_ds)))
    os.replace(tmp, path)
    _recorded.add(path)
