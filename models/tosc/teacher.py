"""The tosc teacher and its pre-stored outputs.

The teacher is the TOSC system around a ResNet-18 semantic encoder, trained centrally
on a public split of the source that no client owns and cached in a local file
(`distill.teacher.checkpoint`, models/pretrained.py); an edge device receives that file
once, like a pre-trained model. (Not the `mtsc` model at a larger size: its BART-style
LAM does not learn the classification task within minutes of CPU training;
docs/tosc.md.) Each client runs the teacher once over its training set, stores the
outputs compressed (float16 top-k logits, optional float16 features) and reuses them
every epoch and every round (the paper's pre-stored compression).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from common.config import ChannelConfig, ExperimentConfig, resolve_path
from common.data.tensor_dataset import TensorDictDataset
from common.seeding import seeded
from models import pretrained
from models.tosc.losses import information_bottleneck_kl
from models.tosc.model import TOSCModel, resnet18_trunk

KIND = "tosc-teacher"
CHECKPOINT_KEY = "distill.teacher.checkpoint"


def teacher_fingerprint(cfg: ExperimentConfig) -> dict:
    """What the stored teacher depends on; a checkpoint made for other values is refused."""
    t = dataclasses.asdict(cfg.distill.teacher)
    t.pop("checkpoint")
    seed = t.pop("seed")
    channel = dataclasses.asdict(cfg.channel)
    channel.pop("sweep_snr_db")
    return {"teacher": t, "seed": seed, "channel": channel,
            "data": pretrained.public_data_fingerprint(cfg.data)}


def teacher_path(cfg: ExperimentConfig) -> Path:
    return resolve_path(cfg.distill.teacher.checkpoint)


def public_split(cfg: ExperimentConfig) -> TensorDictDataset:
    """The teacher's training data: the source's public split (the examples after the
    clients'), so no client owns them; too small a source is refused with the fix."""
    return pretrained.public_split(cfg.data, cfg.distill.teacher.public_samples,
                                   "distill.teacher.public_samples")


def build_teacher(cfg: ExperimentConfig) -> TOSCModel:
    t = cfg.distill.teacher
    with seeded(t.seed + 3):
        return TOSCModel(cfg, resnet18_trunk(), t.latent_dim, t.hidden)


def train_teacher(cfg: ExperimentConfig, log=print) -> tuple[TOSCModel, dict]:
    """Train the teacher centrally on the public split: AdamW on cross-entropy plus
    the same IB term (beta) as the students, channel SNRs drawn as configured."""
    t = cfg.distill.teacher
    teacher = build_teacher(cfg)
    data = public_split(cfg)
    torch.manual_seed(t.seed)
    opt = torch.optim.AdamW(teacher.parameters(), lr=t.lr)
    loader = DataLoader(data, batch_size=t.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(t.seed))
    start = time.perf_counter()
    teacher.train()
    for epoch in range(t.epochs):
        total, correct = 0.0, 0
        for batch in loader:
            out = teacher(batch["image"])
            loss = (F.cross_entropy(out.logits, batch["label"])
                    + cfg.distill.beta * information_bottleneck_kl(out.mu, out.logvar))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(out.logits)
            correct += (out.logits.argmax(-1) == batch["label"]).sum().item()
        log(f"teacher epoch {epoch + 1}/{t.epochs}: loss {total / len(data):.3f}, "
            f"train accuracy {correct / len(data):.3f}")
    info = {"train_seconds": time.perf_counter() - start, "public_samples": len(data),
            "public_train_accuracy": correct / len(data)}
    return teacher.eval(), info


def ensure_teacher(cfg: ExperimentConfig, log=print) -> Path:
    """The teacher checkpoint: trained and written when missing, else checked."""
    def train() -> dict:
        teacher, info = train_teacher(cfg, log)
        return {"info": info, "state_dict": teacher.state_dict()}

    path = teacher_path(cfg)
    pretrained.ensure(path, KIND, teacher_fingerprint(cfg), CHECKPOINT_KEY, train, log)
    return path


def load_teacher(cfg: ExperimentConfig) -> TOSCModel:
    saved = pretrained.load(
        teacher_path(cfg), KIND, teacher_fingerprint(cfg), CHECKPOINT_KEY,
        "The server trains it before round 1 (python -m simulation) and python -m "
        "reports.tosc trains it too; on a separate device, copy the server's teacher file "
        "to this path (node config teacher-checkpoint).")
    teacher = build_teacher(cfg)
    teacher.load_state_dict(saved["state_dict"])
    return teacher.eval()


@torch.no_grad()
def teacher_logits_features(teacher: TOSCModel, image: Tensor, channel: ChannelConfig
                            ) -> tuple[Tensor, Tensor]:
    """The teacher's logits and features on a noiseless link at the top of the
    configured SNRs: its soft labels are then deterministic and can be stored."""
    teacher.eval()
    lo_hi = channel.snr_range_db
    top = float(lo_hi[1]) if lo_hi is not None else float(channel.snr_db)
    out = teacher(image, torch.full((image.shape[0],), top), noiseless=True)
    return out.logits, out.features


# ----------------------------------------------------------------------------- pre-stored outputs


@dataclass
class TeacherOutputs:
    """Compressed teacher outputs of a dataset, row i for example i."""

    topk_values: np.ndarray  # float16 [N, k]: the k largest logits
    topk_indices: np.ndarray  # uint8 [N, k]: their classes (int16 past 256 classes)
    features: np.ndarray  # float16 [N, D], or [N, 0] without feature matching

    @property
    def nbytes(self) -> int:
        return self.topk_values.nbytes + self.topk_indices.nbytes + self.features.nbytes


@torch.no_grad()
def compute_teacher_outputs(teacher: TOSCModel, data: Dataset, cfg: ExperimentConfig
                            ) -> TeacherOutputs:
    values, indices, features = [], [], []
    index_dtype = torch.uint8 if teacher.head.out_features <= 256 else torch.int16
    for batch in DataLoader(data, batch_size=256):
        logits, h = teacher_logits_features(teacher, batch["image"], cfg.channel)
        top = logits.topk(cfg.distill.top_k, dim=-1)
        values.append(top.values.half())
        indices.append(top.indices.to(index_dtype))
        features.append(h.half() if cfg.distill.feature_weight > 0 else h[:, :0].half())
    return TeacherOutputs(*(torch.cat(x).numpy() for x in (values, indices, features)))


def _store_file(cfg: ExperimentConfig, data: Dataset) -> Path:
    """Keyed by the teacher, the compression settings and the images themselves."""
    key = hashlib.sha1(json.dumps([teacher_fingerprint(cfg), cfg.distill.top_k,
                                   cfg.distill.feature_weight > 0]).encode())
    for batch in DataLoader(data, batch_size=1024):
        key.update(batch["image"].numpy().tobytes())
    folder = (resolve_path(cfg.distill.store_dir) if cfg.distill.store_dir
              else teacher_path(cfg).with_suffix(".outputs"))
    return folder / f"{key.hexdigest()}.npz"


def prestored_teacher_outputs(cfg: ExperimentConfig, data: Dataset
                              ) -> tuple[TeacherOutputs, float]:
    """The stored teacher outputs of `data`, computed (and stored) on first use.

    Returns them and the seconds spent running the teacher now (0 when reused)."""
    path = _store_file(cfg, data)
    if path.is_file():
        with np.load(path) as f:
            return TeacherOutputs(f["topk_values"], f["topk_indices"], f["features"]), 0.0
    start = time.perf_counter()
    # Apart from the caller's random stream: iterating a DataLoader draws a seed from
    # it, so computing here but not when the store exists would make a student's
    # training depend on whether an earlier run had stored its teacher's outputs.
    with torch.random.fork_rng(devices=[]):
        outputs = compute_teacher_outputs(load_teacher(cfg), data, cfg)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **dataclasses.asdict(outputs))
    os.replace(tmp, path)
    return outputs, seconds
