"""Server checkpoints: everything a round loop needs to continue after a crash.

After every round the loop saves one file, `<run_dir>/checkpoint.npz`, holding

- named ArrayRecords (`"global"`: the aggregated adapters or student weights; a split
  loop adds e.g. `"server_half"`), each with its keys in order and dtypes as sent,
- the last finished round,
- the strategy state (a JSON-able dict: strategy name, Python's `random` state that
  Flower's node sampling draws from, anything a strategy keeps between rounds),
- the metrics rows so far and the experiment config.

The file is written beside the old one and renamed over it (`os.replace`), so a
crash in the middle of a save leaves the last good checkpoint in place.

NumPy's `.npz` holds the tensors because it keeps dtypes and shapes exactly and needs
no pickle to read back (`allow_pickle=False`): a checkpoint from someone else cannot
run code. Flower has no on-disk format for ArrayRecords, hence this small module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

CHECKPOINT = "checkpoint.npz"
_META = "__meta__"
_SEP = "::"  # between the record name and the array key inside the .npz


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, ArrayRecord]
    strategy_state: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT


def save_checkpoint(run_dir: str | Path, server_round: int, arrays: dict[str, ArrayRecord],
                    strategy_state: dict[str, Any] | None = None,
                    metrics: list[dict[str, Any]] | None = None,
                    config: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of `server_round` atomically; return its path."""
    for name in arrays:
        if _SEP in name or name == _META:
            raise ValueError(f"checkpoint record name {name!r} may not be {_META!r} "
                             f"or contain {_SEP!r}; use a plain name like 'server_half'")
    meta = {"round": int(server_round),
            "records": {name: list(rec.keys()) for name, rec in arrays.items()},
            "strategy_state": strategy_state or {},
            "metrics": metrics or [],
            "config": config or {}}
    tensors = {f"{name}{_SEP}{i}": rec[key].numpy()
               for name, rec in arrays.items() for i, key in enumerate(rec.keys())}
    tensors[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

    path = checkpoint_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **tensors)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them current
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The last checkpoint saved in `run_dir`, or None if there is none."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data[_META].tobytes().decode())
            arrays = {
                name: ArrayRecord({key: Array(np.ascontiguousarray(data[f"{name}{_SEP}{i}"]))
                                   for i, key in enumerate(keys)})
                for name, keys in meta["records"].items()
            }
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"checkpoint {path} cannot be read ({err}); it was not written "
                         "by this program or the disk is damaged") from err
    return Checkpoint(round=meta["round"], arrays=arrays,
                      strategy_state=meta["strategy_state"], metrics=meta["metrics"],
                      config=meta["config"])
