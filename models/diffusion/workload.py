"""The `diffusion` workload's seam (models/seam.py): the UNet's LoRA adapters are the only
tensors that leave a client (`shared_state`); the segmentation net, the CAM classifier,
the receiver's task net (segmentation, depth, classification heads) and the labels
stay on it.

It runs on any source with segmentation masks (models/diffusion/classes.py: the
source's classes; depth only where the source has depth maps, the synthetic scenes)."""

from __future__ import annotations

import numpy as np
import torch
from peft import get_peft_model_state_dict
from torch.utils.data import Dataset

from common.config import ExperimentConfig
from common.data import load_partition
from common.records import Panel
from models.diffusion.classes import NEEDS, mask_classes, note_depth
from models.diffusion.model import DiffusionSemCom, build
from models.diffusion.pretrain import ensure_pretrained
from models.diffusion.train import evaluate, train_local
from models.shared_state import copy_into

__all__ = ["build", "public_samples", "shared_state", "load_shared_state", "load_data", "train_local",
           "evaluate", "prepare", "TRAIN_METRICS", "EVAL_METRICS", "SUMMARY", "PANELS"]

PREFIX = "unet."

# Recorded from the aggregated client metrics into each round's row.
TRAIN_METRICS = ("loss_denoise", "loss_segnet", "loss_classifier", "loss_receiver")
EVAL_METRICS = ("iou_phase1", "iou_phase3", "iou_gain", "psnr_phase1", "psnr_phase3",
                "ssim_phase1", "ssim_phase3", "depth_rmse_phase1", "depth_rmse_phase3",
                "depth_si_rmse_phase1", "depth_si_rmse_phase3", "accuracy_phase1",
                "accuracy_phase3", "bytes_phase1", "bytes_feedback", "bytes_phase3",
                "rate_phase1", "rate_phase3", "edge_patches", "feedback_is_label")
SUMMARY = {"iou_phase1": "IoU1 {:.3f}", "iou_phase3": "IoU3 {:.3f}", "bytes_phase3": "ph3 {:.0f} B"}
PANELS = (Panel("requested-class IoU", ("iou_phase1", "iou_phase3")),
          Panel("PSNR (dB)", ("psnr_phase1", "psnr_phase3")),
          Panel("depth RMSE", ("depth_rmse_phase1", "depth_rmse_phase3")),
          Panel("bytes per image", ("bytes_phase1", "bytes_phase3", "bytes_feedback")),
          Panel("DDPM loss", ("loss_denoise",)))


def public_samples(cfg: ExperimentConfig) -> int:
    """The public split the server pre-trains on (models/seam.py PublicSplit)."""
    return cfg.diffusion.public_samples


def prepare(cfg: ExperimentConfig) -> None:
    """Run by the server before round 1: the clients need the pretrained DDPM file. A
    source without masks is refused here, before anything trains."""
    mask_classes(cfg.data)
    note_depth(cfg.data)
    ensure_pretrained(cfg)


def load_data(cfg: ExperimentConfig, partition_id: int, num_partitions: int
              ) -> tuple[Dataset, Dataset]:
    """The client's local (train, test) split: images and masks (labels and depth maps
    where the source has them; neither is required)."""
    note_depth(cfg.data)
    return load_partition(cfg.data, partition_id, num_partitions, needs=NEEDS)


def shared_state(model: DiffusionSemCom, lora_train: str = "ab") -> dict[str, np.ndarray]:
    """The only tensors that may leave a client: the UNet's LoRA adapters (only the B
    factors for FFA-LoRA)."""
    return {PREFIX + k: v.detach().cpu().float().numpy()
            for k, v in get_peft_model_state_dict(model.unet).items()
            if not (lora_train == "b" and ".lora_A." in k)}


def _adapter_params(model: DiffusionSemCom) -> dict[str, torch.nn.Parameter]:
    params = dict(model.unet.named_parameters())
    return {PREFIX + k: params[k.replace(".weight", ".default.weight")]
            for k in get_peft_model_state_dict(model.unet)}


def load_shared_state(model: DiffusionSemCom, arrays: dict[str, np.ndarray]) -> None:
    copy_into(_adapter_params(model), arrays, "UNet")
