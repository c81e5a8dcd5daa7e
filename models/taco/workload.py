"""The `taco` workload's seam (models/seam.py): the VQ codec is shared and fine-tuned
federatedly (FedAvg of its weights: about 0.25 M parameters, 1 MB a round, small
enough to send whole, so no LoRA); the task models stay on the client."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from common.config import ExperimentConfig
from common.data import load_partition
from common.records import Panel
from models.shared_state import copy_into
from models.taco.codec import codec_state, ensure_codec, load_codec
from models.taco.config import NEEDS, check_source
from models.taco.task import switch_mode
from models.taco.train import CODEC, TacoSystem, build, evaluate, train_local

__all__ = ["build", "public_samples", "shared_state", "load_shared_state", "load_data", "train_local",
           "evaluate", "prepare", "initial_shared_state", "TRAIN_METRICS", "EVAL_METRICS",
           "SUMMARY", "PANELS"]

TRAIN_METRICS = ("codec_mse", "codec_context_mse", "codec_vq_loss", "segmentation_loss")
EVAL_METRICS = ("accuracy", "accuracy_original", "accuracy_context", "accuracy_full",
                "kb_per_image", "lsf_rate", "receiver_exact", "psnr", "ssim",
                "switch_iou_before", "switch_iou_after", "switch_extra_kb",
                "majority_class_share")
SUMMARY = {"accuracy": "acc {:.3f}", "kb_per_image": "{:.4f} KB/img", "psnr": "{:.1f} dB"}
PANELS = (
    Panel("accuracy (LSF)", ("accuracy", "accuracy_context", "accuracy_full",
                             "accuracy_original"), reference=("majority_class_share",)),
    Panel("KB per image (LSF)", ("kb_per_image", "switch_extra_kb")),
    Panel("PSNR (dB)", ("psnr",)),
    Panel("SSIM", ("ssim",)),
    Panel("task switch: IoU of the requested class", ("switch_iou_after", "switch_iou_before")),
    Panel("codec fine-tuning MSE", ("codec_mse", "codec_context_mse")),
)


def public_samples(cfg: ExperimentConfig) -> int:
    """The public split the server pre-trains on (models/seam.py PublicSplit)."""
    return cfg.taco.codec.public_samples


def prepare(cfg: ExperimentConfig) -> None:
    """Run by the server before round 1: the codec pre-trained on the source's public
    split. A source without labels is refused first; one without masks is logged as
    running with the task switch off."""
    check_source(cfg)
    switch_mode(cfg.data)
    ensure_codec(cfg)


def initial_shared_state(cfg: ExperimentConfig) -> dict[str, np.ndarray]:
    """Round 0's global codec: the pre-trained file (only the server reads it)."""
    return {CODEC + k: v for k, v in codec_state(load_codec(cfg)).items()}


def load_data(cfg: ExperimentConfig, partition_id: int, num_partitions: int
              ) -> tuple[Dataset, Dataset]:
    """The client's local (train, test) split of the source (labels needed; masks used
    where it has them)."""
    check_source(cfg)
    return load_partition(cfg.data, partition_id, num_partitions, needs=NEEDS)


def shared_state(model: TacoSystem, lora_train: str = "ab") -> dict[str, np.ndarray]:
    """The only tensors that may leave a client: the codec's weights."""
    return {n: p.detach().cpu().float().numpy() for n, p in model.named_parameters()
            if n.startswith(CODEC)}


def load_shared_state(model: TacoSystem, arrays: dict[str, np.ndarray]) -> None:
    codec = {n: p for n, p in model.named_parameters() if n.startswith(CODEC)}
    copy_into(codec, arrays, "codec")
