"""Weights pre-trained once on public scenes, cached in a fingerprinted local file.

The tosc teacher, the taco codec and the diffusion DDPM each start from weights the
server trains centrally before round 1, on a public split of the source that no client
owns (common/data). Training takes minutes, so the result is written to a local file (the
workload's checkpoint key) and read back on every later run; an edge device receives
that file once, like a pretrained model, and never trains it.

The file is a `torch.save` of a dict:
    kind         which weights these are ("tosc-teacher", "taco-codec", "diffusion-ddpm")
    fingerprint  the config values the weights depend on, JSON with sorted keys
    payload      the workload's own dict (state dicts, training info)

A file is used only when its kind and fingerprint are those asked for: a file trained
for other settings, or one that is not ours, is refused with what differs and the fix,
never silently loaded.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from common import data
from common.config import DataConfig


def public_split(data_cfg: DataConfig, size: int, key: str) -> Dataset:
    """`size` examples of the source that no client owns (common/data: the public split);
    `key` is the config key of `size`, for the error when the source is too small."""
    return data.public_split(data_cfg, size, key)


def public_data_fingerprint(data_cfg: DataConfig) -> dict:
    """The data values that change the public split's examples (its size is each
    workload's own)."""
    return data.public_fingerprint(data_cfg)


def ensure(path: Path, kind: str, fingerprint: dict, key: str,
           train_fn: Callable[[], dict], log=print) -> dict:
    """The payload of `path`: checked when the file exists, else trained and written."""
    if path.is_file():
        return _checked(path, kind, fingerprint, key)
    log(f"no {kind} file at {path}: training it")
    start = time.perf_counter()
    payload = train_fn()
    _write(path, {"kind": kind, "fingerprint": _canonical(fingerprint), "payload": payload})
    log(f"{kind} saved to {path} ({time.perf_counter() - start:.0f} s)")
    return payload


def load(path: Path, kind: str, fingerprint: dict, key: str, missing_hint: str) -> dict:
    """The payload of `path`, refused unless it holds `kind` made for `fingerprint`."""
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no {kind} file at {path}. {missing_hint}")
    return _checked(path, kind, fingerprint, key)


def _canonical(fingerprint: dict) -> str:
    return json.dumps(fingerprint, sort_keys=True)


def _write(path: Path, saved: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is atomic: a crash never leaves half a file at `path`.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(saved, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _checked(path: Path, kind: str, fingerprint: dict, key: str) -> dict:
    retrain = f"Delete it to retrain, or set {key} to a new file."
    # A file that is not ours may be someone's own: the fix leads with a new path.
    foreign = f"Set {key} to a new file to train one there, or delete this one if unneeded."
    mtime_ns = path.stat().st_mtime_ns
    try:
        saved = _read(str(path), mtime_ns)
    except Exception as err:  # torch raises many types for a file that is not its own
        # torch's own text suggests weights_only=False, which would run the file's code.
        raise ValueError(f"{key}: {path} is not a {kind} file: torch cannot load it with "
                         f"weights_only=True ({type(err).__name__}), so it is not a torch file "
                         f"or holds objects other than tensors and plain data. {foreign}"
                         ) from None
    have = _fingerprint_of(saved)
    if have is None:
        held = (f"a dict of {sorted(map(str, saved))}" if isinstance(saved, dict)
                else f"a {type(saved).__name__}")
        raise ValueError(f"{key}: {path} holds {held}, not pretrained weights with a kind and "
                         f"a fingerprint, so it is not a {kind} file. {foreign}")
    if saved["kind"] != kind:
        # Not for us to delete: it is another workload's cache.
        raise ValueError(f"{key}: {path} holds a {saved['kind']}, not a {kind}. Set {key} "
                         f"to the {kind}'s own file (a new path trains one).")
    want = json.loads(_canonical(fingerprint))  # tuples become lists, as in the file
    if have != want:
        raise ValueError(f"{key}: {kind} file {path} was trained for other settings "
                         f"({_differences(have, want)}). {retrain}")
    return saved["payload"]


def _fingerprint_of(saved) -> dict | None:
    """The fingerprint in a loaded file, or None when this module did not write it."""
    if not (isinstance(saved, dict) and {"kind", "fingerprint", "payload"} <= saved.keys()):
        return None
    try:
        have = json.loads(saved["fingerprint"])
    except (TypeError, ValueError):
        return None
    return have if isinstance(have, dict) else None


def _differences(have: dict, want: dict) -> str:
    """'teacher.hidden: file 64, config 128; ...' over the dotted keys that differ."""
    have, want = _dotted(have), _dotted(want)
    return "; ".join(f"{k}: file {_shown(have, k)}, config {_shown(want, k)}"
                     for k in sorted(have.keys() | want.keys())
                     if k not in have or k not in want or have[k] != want[k])


def _shown(values: dict, key: str) -> str:
    return json.dumps(values[key]) if key in values else "absent"


def _dotted(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@functools.lru_cache(maxsize=2)
def _read(path: str, mtime_ns: int):
    # Cached per (path, mtime): the clients of one simulation process read the same file.
    return torch.load(path, map_location="cpu", weights_only=True)
