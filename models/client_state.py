"""What a client keeps for itself between rounds, and where it keeps it on its disk.

The ClientApp (fl_client) saves these tensors after every round it trains; the drivers
that look at a finished run (reports/runs.py) read them back. Both use this module, so
the two never disagree on which tensors a client keeps or where the file lies:

    <state dir>/<run key>/partition-<id>/round-<r>.npz
    <state dir>/<run key>/partition-<id>/data-indices.json   (which examples it holds)

The shared tensors (`shared_state` of a workload) travel to the server; these stay.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from common import data
from common.config import ExperimentConfig

DATA_INDICES_FILE = "data-indices.json"


def client_lora_rank(cfg: ExperimentConfig, partition_id: int) -> int:
    """A client's LoRA rank: `lora.client_ranks` round-robin over partitions
    (heterogeneous ranks, svd_lora), else `lora.rank`."""
    ranks = cfg.lora.client_ranks
    return ranks[partition_id % len(ranks)] if ranks else cfg.lora.rank


def client_budget(cfg: ExperimentConfig, partition_id: int) -> float | str | None:
    """A client's transmitter budget (mtsc, models/mtsc/compression.py): the node's own
    (node config transmitter-budget, which is `model.transmitter_budget` on the node),
    else `model.client_budgets` round-robin over partitions, else None (the full model)."""
    model = cfg.sections.get("model")
    if model is None or not hasattr(model, "client_budgets"):
        return None
    if model.transmitter_budget is not None:
        return model.transmitter_budget
    table = model.client_budgets
    return table[partition_id % len(table)] if table else None


def client_experiment(cfg: ExperimentConfig, partition_id: int) -> ExperimentConfig:
    """The experiment as client `partition_id` builds its model: with its own budget in
    `model.transmitter_budget`; `cfg` itself when it has none or has it already."""
    budget = client_budget(cfg, partition_id)
    if budget is None or budget == cfg.model.transmitter_budget:
        return cfg
    out = copy.deepcopy(cfg)
    out.sections["model"] = dataclasses.replace(cfg.model, transmitter_budget=str(budget))
    return out


def local_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a node keeps between rounds: every trainable parameter, and the
    running statistics of the batch-norm layers it trains. Those are buffers, not
    parameters, but learned from the node's data like them: without them a BatchNorm
    layer would start every round at mean 0 / variance 1 and score with statistics it
    never saw."""
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for prefix, module in model.named_modules():
        if (isinstance(module, torch.nn.modules.batchnorm._NormBase)
                and module.track_running_stats
                and any(p.requires_grad for p in module.parameters())):
            for name, buf in module.named_buffers(recurse=False):
                tensors[f"{prefix}.{name}" if prefix else name] = buf
    return tensors


def load_local_parameters(model: torch.nn.Module, saved: dict[str, np.ndarray]) -> None:
    """Copy a node's saved tensors into `model` (see `local_parameters`); a name the model
    does not keep, or a shape that differs, is refused."""
    params = local_parameters(model)
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise KeyError(f"saved client state has tensors this model does not keep: "
                       f"{unknown[:3]}; was it saved by another workload or config?")
    with torch.no_grad():
        for name, arr in saved.items():
            value = torch.from_numpy(np.asarray(arr))
            if value.shape != params[name].shape:
                raise ValueError(f"saved client state {name}: shape {tuple(value.shape)}, "
                                 f"the model has {tuple(params[name].shape)}")
            params[name].copy_(value)


def partition_folder(state_dir: str | Path, run_key: str, partition_id: int) -> Path:
    """The folder of one partition's saved rounds of one run."""
    return Path(state_dir) / run_key / f"partition-{partition_id}"


def round_file(folder: Path, server_round: int) -> Path:
    return folder / f"round-{server_round}.npz"


def saved_rounds(folder: Path) -> list[tuple[int, Path]]:
    """(round, file) of every round saved in `folder`, oldest first."""
    return sorted((int(p.stem.split("-")[1]), p) for p in folder.glob("round-*.npz"))


def read_state_file(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def data_record(cfg: ExperimentConfig, train_ds, test_ds) -> dict:
    """What data-indices.json holds: the source (with its fingerprint, so an audit can
    tell that the files changed) and the indices into it of the client's train and test
    examples."""
    return {"source": cfg.data.name, "fingerprint": data.source_fingerprint(cfg.data),
            "train": [int(i) for i in train_ds.indices],
            "test": [int(i) for i in test_ds.indices]}


def read_data_record(folder: Path) -> dict | None:
    path = folder / DATA_INDICES_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())
