"""Every registered workload implements the seam of models/seam.py, with the call
signatures the engine and the drivers use; the split workloads implement its second
Protocol too, and the engine refuses split training of a workload without one."""

import inspect
from typing import Generic, Protocol

import pytest

from common.config import ConfigError, load_config
from common.workloads import WORKLOADS, workload_module
from models import get_split_workload
from models.seam import ClassLogits, InitialSharedState, SplitWorkload, Workload


def protocol_members(protocol: type) -> dict[str, object]:
    """The members a Protocol declares (its own and its bases'), by name."""
    out: dict[str, object] = {}
    for base in reversed(protocol.__mro__):
        if base in (object, Protocol, Generic) or not getattr(base, "_is_protocol", False):
            continue
        names = set(vars(base)) | set(getattr(base, "__annotations__", {}))
        out.update({n: vars(base).get(n) for n in names if not n.startswith("_")})
    return out


def signature_mismatches(module, protocol: type) -> list[str]:
    """Members of `protocol` that `module` lacks, or defines with other positional
    arguments, other keyword names or other defaults (more arguments, with defaults,
    are a workload's own options)."""
    problems = []
    for name, member in protocol_members(protocol).items():
        if not hasattr(module, name):
            problems.append(f"{name}: missing")
            continue
        if not inspect.isfunction(member):
            continue
        want = list(inspect.signature(member).parameters.values())[1:]  # without self
        have = list(inspect.signature(getattr(module, name)).parameters.values())
        extra = have[len(want):]
        if len(have) < len(want) or any(h.default is inspect.Parameter.empty for h in extra):
            problems.append(f"{name}: {len(have)} arguments, the seam has {len(want)}")
            continue
        for w, h in zip(want, have):
            if w.default is not inspect.Parameter.empty and (w.name, w.default) != (h.name, h.default):
                problems.append(f"{name}: {h.name}={h.default!r}, the seam has "
                                f"{w.name}={w.default!r}")
            elif w.default is inspect.Parameter.empty and h.default is not inspect.Parameter.empty:
                problems.append(f"{name}: {h.name} has a default, the seam requires it")
    return problems


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_workload_implements_the_seam_with_its_signatures(name):
    assert {"build", "train_local", "evaluate", "prepare", "PANELS"} <= set(
        protocol_members(Workload))
    assert {"server_forward", "LABEL_ROW", "build"} <= set(protocol_members(SplitWorkload))
    workload = workload_module(name, "workload")
    assert isinstance(workload, Workload)
    assert signature_mismatches(workload, Workload) == []
    for optional in (InitialSharedState, ClassLogits, SplitWorkload):
        if isinstance(workload, optional):
            assert signature_mismatches(workload, optional) == [], optional.__name__
    # A workload's config says whether it splits; its module must agree.
    assert workload_module(name, "config").SPLIT == isinstance(workload, SplitWorkload)


def test_the_signature_check_finds_what_a_workload_got_wrong():
    class Broken:
        TRAIN_METRICS = EVAL_METRICS = PANELS = ()
        SUMMARY = {}

        @staticmethod
        def build(cfg, device="cuda", lora_rank=None):  # another default
            ...

        @staticmethod
        def train_local(model, data, cfg, lora_train="ab", seed=0):  # lacks make_private
            ...

    problems = signature_mismatches(Broken, Workload)
    assert "build: device='cuda', the seam has device='cpu'" in problems
    assert "train_local: 5 arguments, the seam has 6" in problems
    assert "evaluate: missing" in problems and "prepare: missing" in problems


def test_split_training_of_a_workload_without_a_split_is_refused():
    with pytest.raises(ConfigError, match="only mtsc has a U-shaped split"):
        load_config("configs/distill_quickstart.yaml", ["split.mode=parallel"])
    with pytest.raises(ValueError, match="'tosc' has no U-shaped split"):
        get_split_workload("tosc")
    assert isinstance(get_split_workload("mtsc"), SplitWorkload)
