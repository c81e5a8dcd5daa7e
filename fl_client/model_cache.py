"""One model per client process, reset for every message instead of built anew.

Flower calls the ClientApp once per message, and a Ray actor (or a long-lived node
process) serves many clients in turn, so building the workload's model per message
(the LAM from its config, peft's injection, a pre-trained codec read from disk) is
paid per client per round: a quarter of an actor's busy time in a quickstart round
(benchmarks/profile_round.py). Here a process keeps what it built, keyed by what
shapes the model (the experiment, the client's LoRA rank, the device), with a copy of
its state as built: every parameter and buffer, which parameters train, which modules
are in training mode. A message takes the model out of the cache (a concurrent
message with the same key builds its own), resets it to that copy, and puts it back
when it is done; the private state and the global arrays then load into it exactly as
into a fresh build, so the numbers are the same (tests/test_model_cache.py).

A model that holds any hook when it comes back (Opacus's DP-SGD wraps its modules with
them) is dropped rather than reused, and DP-SGD runs are never cached.
`simulation.reuse_models: false` turns the cache off.
"""

from __future__ import annotations

import collections
import copy
import threading
from collections.abc import Callable

import torch
from torch import nn

MAX_MODELS = 4  # a few LoRA ranks or devices per process; each entry is one model


class _Entry:
    def __init__(self, model: nn.Module):
        self.model = model
        self.state = copy.deepcopy(model.state_dict())
        self.trainable = {n: p.requires_grad for n, p in model.named_parameters()}
        self.training = {n: m.training for n, m in model.named_modules()}

    def reset(self) -> nn.Module:
        model = self.model
        model.load_state_dict(self.state)
        for name, p in model.named_parameters():
            p.requires_grad_(self.trainable[name])
        for name, m in model.named_modules():
            m.training = self.training[name]
        return model


_cache: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
_owner: dict[int, tuple[tuple, _Entry]] = {}  # id(model) -> its key and entry, while out
_lock = threading.Lock()


def _has_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or m._backward_pre_hooks for m in model.modules())


def checkout(key: tuple, build: Callable[[], nn.Module], enabled: bool = True) -> nn.Module:
    """The model of `key`, reset to how `build` made it; built (and remembered) on the
    first call."""
    if not enabled:
        return build()
    with _lock:
        entry = _cache.pop(key, None)
    if entry is not None:
        model = entry.reset()
    else:
        model = build()
        entry = _Entry(model)
    with _lock:
        _owner[id(model)] = (key, entry)
    return model


def checkin(model: nn.Module) -> None:
    """Give a model from `checkout` back for the next message (dropped if it now holds
    hooks, or if it did not come from the cache)."""
    with _lock:
        key, entry = _owner.pop(id(model), (None, None))
        if entry is None or entry.model is not model or _has_hooks(model):
            return
        _cache[key] = entry
        while len(_cache) > MAX_MODELS:
            _cache.popitem(last=False)


def clear() -> None:
    with _lock:
        _cache.clear()
        _owner.clear()


def cached_models() -> int:
    return len(_cache)


def model_key(experiment_json: str, lora_rank: int, device: torch.device) -> tuple:
    return (experiment_json, int(lora_rank), str(device))
