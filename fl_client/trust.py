"""The node's trust boundary: what a ClientApp takes from the server, and what it never does.

fedsemcom's nodes are run by other people than the server. A message from the server
may steer training (the experiment config, the global arrays, split tensors); it may
never steer the node's disk, network or device. So:

- Node-only keys (NODE_KEYS): the state folder, the data's paths (root, masks, files,
  Hugging Face dataset), dataset download and hub access, local
  checkpoints, the teacher's pre-stored outputs and the device come from the SuperNode's
  node config or the node's own defaults. A server-sent value that differs is ignored
  with a warning, or refused where ignoring it would silently change the results
  (REFUSED_UNLESS_SET_ON_NODE).
- Names from the server that become part of a path ("run-key") must be a single safe
  path component, and the resolved path must lie inside the node's state folder.
- Arrays from the server are checked as the server checks replies
  (strategies/reply_checks.py): expected keys, shapes, dtypes, finite values, a size cap.

A message that fails a check raises `Refused`; the ClientApp answers it with an error
reply (code REFUSED) naming the value, writes nothing and keeps serving.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.config import ConfigError, ExperimentConfig, config_from_dict
from models.split_wire import decode

log = logging.getLogger("fedsemcom")

REFUSED = 4002  # error code of the reply to a message the node will not act on

# Experiment key -> the node config key that sets it on a SuperNode. Whatever the server
# sends for these keys, the node uses its own value (node config, else the default).
NODE_KEYS = {
    "client_state_dir": "state-dir",
    "data.root": "data-root",
    "data.download": "data-download",
    "data.hf_dataset": "data-hf-dataset",
    "data.data_files": "data-files",
    "data.masks_root": "data-masks-root",
    "data.allow_hub": "data-allow-hub",
    "device": "device",
    "model.checkpoint": "model-checkpoint",
    "model.knowledge_base": "knowledge-base",
    "model.knowledge_embedder": "knowledge-embedder",
    "model.transmitter_budget": "transmitter-budget",  # mtsc: docs/compression.md
    "distill.teacher.checkpoint": "teacher-checkpoint",
    "distill.store_dir": "teacher-store-dir",
    "diffusion.checkpoint": "diffusion-checkpoint",
    "diffusion.clip_checkpoint": "diffusion-clip-checkpoint",
}
# A pre-trained LAM changes every result, and so do the receiver's knowledge base and the
# model that embeds it (mtsc retrieval): a server that asks for one is refused unless the
# node has its own copy, rather than silently training without it.
REFUSED_UNLESS_SET_ON_NODE = {"model.checkpoint", "model.knowledge_base",
                              "model.knowledge_embedder"}
BOOL_NODE_KEYS = {"data-download", "data-allow-hub"}
LIST_NODE_KEYS = {"data-files"}  # comma-separated in the node config

MAX_EXPERIMENT_CHARS = 1_000_000  # the experiment JSON; real ones are a few kB
# All arrays of one message, before any is decoded (node config `max-message-mb`).
MAX_MESSAGE_MB = 256.0
NPY_HEADER_SLACK = 4096  # bytes an .npy header may add to an array's payload
MAX_ROUND = 1_000_000
LORA_TRAIN = ("ab", "b")


class Refused(Exception):
    """The node will not act on this message; the reason names the value."""


# --------------------------------------------------------------------------- node config


def _default(dotted: str) -> Any:
    return _get(ExperimentConfig().to_dict(), dotted)


def _get(raw: Mapping, dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise Refused(f"experiment config key '{'.'.join(parts[:i + 1])}' is not a mapping")
    node[parts[-1]] = value


def node_value(node_config: Mapping, dotted: str) -> Any:
    """The node's own value of a node-only key: its node config, else the default."""
    key = NODE_KEYS[dotted]
    if key not in node_config:
        return _default(dotted)
    value = node_config[key]
    if key in BOOL_NODE_KEYS:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise Refused(f"node config {key}={value!r}: expected true or false")
        return value
    if not isinstance(value, str) or not value:
        raise Refused(f"node config {key}={value!r}: expected a non-empty string")
    if key in LIST_NODE_KEYS:
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def node_config_of(cfg: ExperimentConfig) -> dict[str, Any]:
    """The node config of a node whose operator also runs the server (the simulation
    engine, in-process tests): the experiment's own values of the node-only keys."""
    raw = cfg.to_dict()
    out = {key: _get(raw, dotted) for dotted, key in NODE_KEYS.items()}
    out.update({k: ",".join(out[k]) or None for k in LIST_NODE_KEYS if k in out})
    # Node config has no null, and an empty value is refused (node_value): a key that is
    # off ("" for diffusion.clip_checkpoint) is left out, so the node's default applies.
    return {k: v for k, v in out.items() if v is not None and v != ""}


_warned: set[tuple[str, str]] = set()


def _warn_once(dotted: str, sent: Any, used: Any) -> None:
    if (dotted, repr(sent)) in _warned:
        return
    _warned.add((dotted, repr(sent)))
    log.warning("ignoring %s=%r from the server: it is the node's to choose (node config "
                "%s); using %r", dotted, sent, NODE_KEYS[dotted], used)


def node_experiment(msg: Message, context: Context) -> ExperimentConfig:
    """The experiment config of a message with the node's own node-only keys."""
    raw = _config(msg).get("experiment")
    if not isinstance(raw, str):
        raise Refused(f"config 'experiment' must be a JSON string, got {type(raw).__name__}")
    if len(raw) > MAX_EXPERIMENT_CHARS:
        raise Refused(f"config 'experiment' has {len(raw)} characters, more than "
                      f"{MAX_EXPERIMENT_CHARS}")
    node = tuple(sorted((k, v) for k, v in context.node_config.items()
                        if k in NODE_KEYS.values()))
    return _node_experiment(raw, node)


@functools.lru_cache(maxsize=8)
def _node_experiment(raw: str, node: tuple[tuple[str, Any], ...]) -> ExperimentConfig:
    try:
        sent = json.loads(raw)
    except ValueError as err:
        raise Refused(f"config 'experiment' is not valid JSON ({err})") from None
    if not isinstance(sent, dict):
        raise Refused(f"config 'experiment' must be a JSON mapping, got {type(sent).__name__}")
    node_config = dict(node)
    for dotted in NODE_KEYS:
        value, mine = _get(sent, dotted), node_value(node_config, dotted)
        if value is not None and value != mine:
            if dotted in REFUSED_UNLESS_SET_ON_NODE and NODE_KEYS[dotted] not in node_config:
                raise Refused(
                    f"the server sets {dotted}={value!r}, which is the node's to choose; this "
                    f"node has no node config {NODE_KEYS[dotted]}, and building the model "
                    "without it would change the results. Start the SuperNode with "
                    f"--node-config '{NODE_KEYS[dotted]}=\"<local folder>\"' or run the "
                    f"experiment with {dotted}=null")
            _warn_once(dotted, value, mine)
        _set(sent, dotted, mine)
    try:
        return config_from_dict(sent)
    except ConfigError as err:
        hint = next((f" ({dotted} is the node's: node config {key})" for dotted, key in
                     NODE_KEYS.items() if f"'{dotted}'" in str(err)), "")
        raise Refused(f"experiment config refused: {err}{hint}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        raise Refused(f"experiment config refused: {type(err).__name__}: {err}") from None


# --------------------------------------------------------------------------- message fields


def _config(msg: Message) -> ConfigRecord:
    if not msg.has_content():
        raise Refused("the message carries no content")
    config = msg.content.config_records.get("config")
    if config is None:
        raise Refused("the message lacks the ConfigRecord 'config'")
    return config


def safe_component(value: Any, what: str) -> str:
    """A server-sent name that becomes one path component: no separator, no '..'."""
    if not isinstance(value, str):
        raise Refused(f"{what}={value!r} must be a string, got {type(value).__name__}")
    bad = (not value or len(value) > 128 or value in (".", "..") or value != value.strip()
           or any(c in value for c in "/\\:") or any(ord(c) < 32 or ord(c) == 127 for c in value)
           or Path(value).name != value)
    if bad:
        raise Refused(f"{what}={value!r} is not a single safe path component (1-128 "
                      "characters, no '/', '\\', ':', control characters, '.' or '..')")
    return value


def inside(path: Path, root: Path, what: str) -> Path:
    """`path`, after resolving links and '..', if it lies inside `root`; else refused."""
    resolved, top = path.resolve(), root.resolve()
    if resolved != top and top not in resolved.parents:
        raise Refused(f"{what} resolves to {resolved}, outside the node's state folder {top}")
    return resolved


def run_key(msg: Message) -> str | None:
    value = _config(msg).get("run-key")
    return None if value in (None, "") else safe_component(value, "run-key")


def server_round(msg: Message) -> int:
    value = _config(msg).get("server-round", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ROUND:
        raise Refused(f"server-round={value!r}: expected an integer 0..{MAX_ROUND}")
    return value


def lora_train(msg: Message) -> str:
    value = _config(msg).get("lora-train", "ab")
    if value not in LORA_TRAIN:
        raise Refused(f"lora-train={value!r}: expected one of {LORA_TRAIN}")
    return value


def check_message(msg: Message, context: Context) -> ExperimentConfig:
    """Every message-level field the handlers read, checked before any of them runs."""
    cap_mb = context.node_config.get("max-message-mb", MAX_MESSAGE_MB)
    if isinstance(cap_mb, bool) or not isinstance(cap_mb, (int, float)) or not cap_mb > 0:
        raise Refused(f"node config max-message-mb={cap_mb!r}: expected a number > 0")
    cap = float(cap_mb) * 2**20
    if not msg.has_content():
        raise Refused("the message carries no content")
    total = sum(len(a.data) for r in msg.content.array_records.values() for a in r.values())
    if total > cap:
        raise Refused(f"the message's arrays take {total} bytes, more than this node's "
                      f"limit of {cap:.0f} (node config max-message-mb)")
    cfg = node_experiment(msg, context)
    run_key(msg), server_round(msg), lora_train(msg)
    config = _config(msg)
    if KEY_CLIPPING_NORM in config:
        norm = config[KEY_CLIPPING_NORM]
        if (isinstance(norm, bool) or not isinstance(norm, (int, float))
                or not math.isfinite(norm) or norm <= 0):
            raise Refused(f"{KEY_CLIPPING_NORM}={norm!r}: expected a finite number > 0")
    return cfg


def screen(msg: Message, context: Context, call_next) -> Message:
    """Client mod: refuse a malformed message before any handler or other mod reads it."""
    check_message(msg, context)
    return call_next(msg, context)


# --------------------------------------------------------------------------- arrays


def _decoded(key: str, array, shape: tuple[int, ...], dtype: np.dtype, what: str) -> np.ndarray:
    """One incoming Array as NumPy, checked before and after decoding."""
    if getattr(array, "stype", None) != "numpy.ndarray":
        raise Refused(f"{what} '{key}' is not a NumPy array")
    if tuple(array.shape) != shape or str(array.dtype) != dtype.name:
        raise Refused(f"{what} '{key}' has shape {tuple(array.shape)} and dtype "
                      f"{array.dtype}, expected {shape} and {dtype}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(array.data) > nbytes + NPY_HEADER_SLACK:  # before decoding: no large allocation
        raise Refused(f"{what} '{key}' takes {len(array.data)} bytes, more than the "
                      f"{nbytes} of shape {shape}")
    try:
        arr = array.numpy()
    except (TypeError, ValueError, OSError) as err:
        raise Refused(f"{what} '{key}' cannot be decoded ({err})") from None
    if arr.shape != shape or arr.dtype != dtype:
        raise Refused(f"{what} '{key}' decodes to shape {arr.shape} and dtype {arr.dtype}, "
                      f"expected {shape} and {dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise Refused(f"{what} '{key}' contains NaN or Inf")
    return arr


def _record(msg: Message, name: str, what: str) -> ArrayRecord:
    record = msg.content.array_records.get(name)
    if record is None:
        raise Refused(f"the message lacks the ArrayRecord '{name}' ({what})")
    return record


def shared_arrays(msg: Message, expected: Mapping[str, Any], required: set[str],
                  max_rank: int | None = None) -> dict[str, np.ndarray]:
    """The global arrays of a message (adapters, student weights), checked against the
    arrays this node would send (`expected`: keys to arrays, or anything with their
    `.shape` and `.dtype`). With `max_rank`
    (svd_lora) a LoRA factor may have any rank up to it in its rank dimension."""
    what = "global array"
    record = _record(msg, "arrays", "the global arrays")
    unexpected = sorted(set(record) - set(expected))
    missing = sorted(required - set(record))
    if unexpected or missing or not record:
        raise Refused(f"the global arrays' keys differ from this model's: {len(missing)} "
                      f"missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
                      + ("" if record else " (the record is empty)"))
    out = {}
    for key, array in record.items():
        want = expected[key]
        shape = tuple(want.shape)
        rank_dim = 0 if ".lora_A." in key else 1 if ".lora_B." in key else None
        if max_rank is not None and rank_dim is not None and len(array.shape) == len(shape):
            rank = array.shape[rank_dim]
            if isinstance(rank, int) and 1 <= rank <= max_rank:
                shape = shape[:rank_dim] + (rank,) + shape[rank_dim + 1:]
        out[key] = _decoded(key, array, shape, want.dtype, what)
    for key, arr in out.items():  # a module's A and B must share one rank
        if ".lora_A." in key and (b := out.get(key.replace(".lora_A.", ".lora_B."))) is not None:
            if arr.shape[0] != b.shape[1]:
                raise Refused(f"global array '{key}' has rank {arr.shape[0]} but its B "
                              f"factor has {b.shape[1]}")
    return out


class _Spec(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype


# Per model object: the keys, shapes and dtypes it shares, by (lora_train, client half).
# They follow from the model's structure, which a model never changes, and computing
# them means copying every shared tensor: a tenth of a quickstart client's round.
_SPECS: weakref.WeakKeyDictionary[torch.nn.Module, dict] = weakref.WeakKeyDictionary()


def _shared_specs(workload, model: torch.nn.Module, train: str, client_half_only: bool
                  ) -> dict[str, _Spec]:
    specs = _SPECS.setdefault(model, {})
    if (train, client_half_only) not in specs:
        kwargs = {"client_half_only": True} if client_half_only else {}
        specs[train, client_half_only] = {
            k: _Spec(tuple(v.shape), v.dtype)
            for k, v in workload.shared_state(model, train, **kwargs).items()}
    return specs[train, client_half_only]


def global_arrays(workload, model: torch.nn.Module, cfg: ExperimentConfig, msg: Message,
                  client_half_only: bool = False) -> dict[str, np.ndarray]:
    """The global arrays of `msg`, checked against what this node's model shares: keys,
    shapes (svd_lora: any rank up to the largest configured), dtypes, finite values."""
    expected = _shared_specs(workload, model, "ab", client_half_only)
    # A compressed mtsc client holds fewer LAM encoder layers: the server's adapters of
    # the others are checked as the full model's, and not loaded (docs/compression.md).
    expected = {**getattr(model, "dropped_adapters", {}), **expected}
    required = set()
    if msg.metadata.message_type.startswith("train"):  # what it will train and send back
        required = set(_shared_specs(workload, model, lora_train(msg), client_half_only))
    max_rank = None
    if cfg.strategy.name == "svd_lora":
        max_rank = max([cfg.lora.rank, cfg.strategy.svd_rank, *cfg.lora.client_ranks])
    return shared_arrays(msg, expected, required, max_rank)


# Split codecs (models/split_wire.py) by the dtype their tensors travel in.
CODEC_DTYPES = {"none": np.float32, "float16": np.float16, "bfloat16": np.int16,
                "int8": np.int8}


def split_tensors(msg: Message, record_name: str, shapes: Mapping[str, tuple[int, ...]],
                  codecs: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of a split message (server output, gradients), checked and decoded:
    exactly the expected entries, each in its codec's dtype and the expected shape,
    finite, with a finite positive int8 scale."""
    what = f"split tensor ({record_name})"
    record = _record(msg, record_name, what)
    want = set(shapes) | {f"{n}.scale" for n in shapes if codecs[n] == "int8"}
    if set(record) != want:
        raise Refused(f"{what}: got entries {sorted(record)[:6]}, expected {sorted(want)}")
    out = {}
    for name, shape in shapes.items():
        _decoded(name, record[name], tuple(shape), np.dtype(CODEC_DTYPES[codecs[name]]), what)
        if codecs[name] == "int8":
            scale = _decoded(f"{name}.scale", record[f"{name}.scale"], (1,),
                             np.dtype(np.float32), what)
            if not scale[0] > 0:
                raise Refused(f"{what} '{name}.scale' must be > 0, got {scale[0]!r}")
        out[name] = decode(record, name)
        if not torch.isfinite(out[name]).all():  # e.g. a float16 that overflows
            raise Refused(f"{what} '{name}' contains NaN or Inf")
    return out
