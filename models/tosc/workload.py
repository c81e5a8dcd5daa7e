"""The `tosc` workload's seam (models/seam.py): distilled lightweight students. The
student's weights are shared with the server (FedAvg or FedProx); the task head stays
on the client (`shared_state`)."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from common.config import ExperimentConfig
from common.data import load_partition
from common.records import Panel
from models.shared_state import copy_into
from models.tosc.config import NEEDS, check_source
from models.tosc.model import HEAD, TOSCModel, build
from models.tosc.teacher import ensure_teacher
from models.tosc.train import class_logits, evaluate, train_local

__all__ = ["build", "public_samples", "shared_state", "load_shared_state", "load_data", "train_local",
           "evaluate", "class_logits", "prepare", "TRAIN_METRICS", "EVAL_METRICS", "SUMMARY",
           "PANELS"]

# Recorded from the aggregated client metrics into each round's row.
TRAIN_METRICS = ("symbols_per_example", "loss_task", "loss_ib", "loss_kd", "loss_feature",
                 "teacher_seconds", "teacher_store_bytes")
EVAL_METRICS = ("accuracy", "majority_class_share")
SUMMARY = {"accuracy": "acc {:.3f}"}
PANELS = (Panel("accuracy", ("accuracy",), reference=("majority_class_share",)),)


def public_samples(cfg: ExperimentConfig) -> int:
    """The public split the server pre-trains on (models/seam.py PublicSplit)."""
    return cfg.distill.teacher.public_samples


def prepare(cfg: ExperimentConfig) -> None:
    """Run by the server before round 1: the clients need the teacher file. A source
    without labels, or with fewer classes than distill.top_k, is refused first."""
    check_source(cfg)
    ensure_teacher(cfg)


def load_data(cfg: ExperimentConfig, partition_id: int, num_partitions: int
              ) -> tuple[Dataset, Dataset]:
    """The client's local (train, test) split of the source (labels needed)."""
    check_source(cfg)
    return load_partition(cfg.data, partition_id, num_partitions, needs=NEEDS)


def shared_state(model: TOSCModel, lora_train: str = "ab") -> dict[str, np.ndarray]:
    """The only tensors that may leave a client: every student weight but the task head."""
    return {name: p.detach().cpu().float().numpy() for name, p in model.named_parameters()
            if not name.startswith(HEAD)}


def load_shared_state(model: TOSCModel, arrays: dict[str, np.ndarray]) -> None:
    student = {n: p for n, p in model.named_parameters() if not n.startswith(HEAD)}
    copy_into(student, arrays, "student")
