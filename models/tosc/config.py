"""The `tosc` workload's config section (`distill:`, with its `teacher:`) and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import WEIGHT_STRATEGIES, ExperimentConfig, need

# What tosc needs of its source, {annotation: task} (common.data.require).
NEEDS = {"label": "classification"}
# len(common.data.scenes.CLASSES), written out so that a config check loads no torch
# (tests/test_tosc.py holds the two equal).
SYNTHETIC_CLASSES = 4


@dataclass
class TeacherConfig:
    """The tosc teacher: the TOSC system around a ResNet-18 encoder, trained centrally
    on a public split of the source that no client owns, saved to `checkpoint`."""

    checkpoint: str = "runs/teachers/teacher.pt"  # local file; trained and written when missing
    seed: int = 0  # the teacher's own seed: students of any `seed` can share one teacher
    latent_dim: int = 32  # real latent dims of the teacher's channel input
    hidden: int = 256  # width of the teacher's semantic decoder
    public_samples: int = 2000  # examples after the clients' (common/data: the public split)
    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3


@dataclass
class DistillConfig:
    """Teacher -> student distillation of the tosc workload."""

    beta: float = 1e-3  # information bottleneck: weight of KL(q(z|x) || N(0, I))
    temperature: float = 4.0  # softening of teacher and student logits in the KD term
    task_weight: float = 1.0  # cross-entropy to the labels
    kd_weight: float = 1.0  # KL to the teacher's softened predictions (0: no distillation)
    feature_weight: float = 0.0  # MSE to the teacher's features (0: no feature matching)
    top_k: int = 4  # teacher logits kept per example in the pre-stored outputs
    latent_dim: int = 16  # real latent dims; latent_dim / 2 complex channel symbols
    width: int = 16  # channels of the student's first conv layer
    hidden: int = 64  # width of the student's semantic decoder
    store_dir: str | None = None  # pre-stored teacher outputs (default: beside the checkpoint)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


SECTIONS = {"distill": DistillConfig}
SPLIT = False
STRATEGIES = WEIGHT_STRATEGIES  # it shares student weights


def check(cfg: ExperimentConfig) -> None:
    dc, t = cfg.distill, cfg.distill.teacher
    need(cfg.strategy.name in STRATEGIES, "strategy.name", cfg.strategy.name,
         f"{' or '.join(repr(n) for n in STRATEGIES)} for workload 'tosc' (it shares "
         "student weights)")
    need(dc.beta >= 0, "distill.beta", dc.beta, ">= 0")
    need(dc.temperature > 0, "distill.temperature", dc.temperature, "> 0")
    for key in ("task_weight", "kd_weight", "feature_weight"):
        need(getattr(dc, key) >= 0, f"distill.{key}", getattr(dc, key), ">= 0")
    if cfg.data.name == "synthetic":
        need(1 <= dc.top_k <= SYNTHETIC_CLASSES, "distill.top_k", dc.top_k,
             f"1 .. {SYNTHETIC_CLASSES} (the synthetic scenes have {SYNTHETIC_CLASSES} classes)")
    else:  # a real source's classes are known once it is read: check_source
        need(dc.top_k >= 1, "distill.top_k", dc.top_k, ">= 1")
    need(dc.latent_dim >= 2 and dc.latent_dim % 2 == 0, "distill.latent_dim", dc.latent_dim,
         "an even integer >= 2 (two real dims make one complex channel symbol)")
    need(dc.width >= 1, "distill.width", dc.width, ">= 1")
    need(dc.hidden >= 1, "distill.hidden", dc.hidden, ">= 1")
    need(t.latent_dim >= 2 and t.latent_dim % 2 == 0, "distill.teacher.latent_dim",
         t.latent_dim, "an even integer >= 2")
    need(t.hidden >= 1, "distill.teacher.hidden", t.hidden, ">= 1")
    need(t.public_samples >= 10, "distill.teacher.public_samples", t.public_samples, ">= 10")
    need(t.epochs >= 1, "distill.teacher.epochs", t.epochs, ">= 1")
    need(t.batch_size >= 1, "distill.teacher.batch_size", t.batch_size, ">= 1")
    need(t.lr > 0, "distill.teacher.lr", t.lr, "> 0")
    need(bool(t.checkpoint), "distill.teacher.checkpoint", t.checkpoint,
         "a local file path (it is trained and written there when missing)")


def check_source(cfg: ExperimentConfig) -> None:
    """The checks that need the source read (its annotations, its class count): run by
    the server before the teacher trains and by a client before it loads its share."""
    from common import data  # torch: not at config time

    data.require(cfg.data, NEEDS)
    classes = data.num_classes(cfg.data)
    need(1 <= cfg.distill.top_k <= classes, "distill.top_k", cfg.distill.top_k,
         f"1 .. {classes} (data.name={cfg.data.name!r} has {classes} classes)")
