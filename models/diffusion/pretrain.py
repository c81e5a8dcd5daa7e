"""The DDPM before federated fine-tuning: trained centrally on public scenes.

Fine-tuning a DDPM from scratch with LoRA alone would leave its base weights random,
so the server first trains the conditional UNet (and the one-step baseline decoder of
the report) on a public split of the source that no client owns (common/data: the
synthetic scenes num_samples .. num_samples + public_samples - 1, or the next
public_samples of a real source's seeded order; it needs their masks) and writes both
to `diffusion.checkpoint`; every client reads that local file (an edge device receives it
once, like a pretrained model). A checkpoint made for other settings is refused with a
message that says what differs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from common import data as data_sources
from common.config import ExperimentConfig, resolve_path
from common.data.tensor_dataset import TensorDictDataset
from common.device import resolve_device
from common.seeding import seeded
from models import pretrained
from models.diffusion.classes import NEEDS, mask_classes

KIND = "diffusion-ddpm"
CHECKPOINT_KEY = "diffusion.checkpoint"

# Keys of `diffusion:` that change the pretrained weights.
_PRETRAIN_KEYS = ("public_samples", "pretrain_steps", "pretrain_batch_size", "pretrain_lr",
                  "baseline_steps", "block_out_channels", "layers_per_block", "train_timesteps",
                  "prediction_type", "cond_drop", "seg_downsample", "edge_threshold")


def fingerprint(cfg: ExperimentConfig) -> dict:
    """What the pretrained weights depend on; a file made for other values is refused.
    A real source's class count is in it too (it sizes the UNet's input; the synthetic
    scenes' is fixed, and their fingerprint stays as it was)."""
    out = {"diffusion": {k: getattr(cfg.diffusion, k) for k in _PRETRAIN_KEYS},
           "seed": cfg.seed, "data": pretrained.public_data_fingerprint(cfg.data)}
    if cfg.data.name != "synthetic":
        out["seg_classes"] = mask_classes(cfg.data).count
    return out


def checkpoint_path(cfg: ExperimentConfig) -> Path:
    return resolve_path(cfg.diffusion.checkpoint)


def public_split(cfg: ExperimentConfig) -> TensorDictDataset:
    """The public split, refused (with how to add masks) when the source has no masks."""
    data_sources.require(cfg.data, NEEDS)
    return pretrained.public_split(cfg.data, cfg.diffusion.public_samples,
                                   "diffusion.public_samples")


def _batches(data: TensorDictDataset, batch_size: int, steps: int, generator: torch.Generator):
    n = len(data)
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        yield data.tensors["image"][idx], data.tensors["segmentation"][idx]


def pretrain(cfg: ExperimentConfig, log=print) -> dict:
    """Train the conditional DDPM and the one-step decoder on the public split."""
    from models.diffusion.ddpm import (
        cond_channels,
        denoising_loss,
        make_unet,
        noise_scheduler,
        one_step_decode,
        training_conditions,
    )

    dc = cfg.diffusion
    device = resolve_device(cfg.device)
    data = public_split(cfg)
    seg_classes = mask_classes(cfg.data).count
    with seeded(cfg.seed + 6):
        unet = make_unet(cfg, 3 + cond_channels(cfg)).to(device)
        decoder = make_unet(cfg, cond_channels(cfg)).to(device)
    scheduler = noise_scheduler(dc)
    losses: dict[str, list[float]] = {"denoise": [], "decoder": []}
    start = time.perf_counter()
    progress = Progress(TextColumn("[bold blue]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} steps"),
                        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn())
    with progress:
        for name, model, steps in (("denoise", unet, dc.pretrain_steps),
                                   ("decoder", decoder, dc.baseline_steps)):
            g = torch.Generator().manual_seed(cfg.seed + (7 if name == "denoise" else 8))
            opt = torch.optim.AdamW(model.parameters(), lr=dc.pretrain_lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            task = progress.add_task(f"pretraining the {'DDPM' if name == 'denoise' else 'one-step decoder'}",
                                     total=steps, loss=float("nan"))
            model.train()
            for image, seg in _batches(data, dc.pretrain_batch_size, steps, g):
                image, seg = image.to(device), seg.to(device)
                cond = training_conditions(image, seg, dc, g, seg_classes)
                if name == "denoise":
                    loss = denoising_loss(model, image, cond, scheduler, g)
                else:
                    loss = F.mse_loss(one_step_decode(model, cond), image)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses[name].append(loss.item())
                progress.update(task, advance=1, loss=sum(losses[name][-20:]) / len(losses[name][-20:]))
    seconds = time.perf_counter() - start
    log(f"pretrained the DDPM ({dc.pretrain_steps} steps) and the one-step decoder "
        f"({dc.baseline_steps} steps) on {len(data)} public images in {seconds:.0f} s")
    return {"unet": {k: v.cpu() for k, v in unet.state_dict().items()},
            "decoder": {k: v.cpu() for k, v in decoder.state_dict().items()},
            "losses": losses, "seconds": seconds}


def ensure_pretrained(cfg: ExperimentConfig, log=print) -> Path:
    """Train and write the checkpoint if missing; refuse one made for other settings."""
    path = checkpoint_path(cfg)
    pretrained.ensure(path, KIND, fingerprint(cfg), CHECKPOINT_KEY,
                      lambda: pretrain(cfg, log), log)
    return path


def load_pretrained(cfg: ExperimentConfig) -> dict:
    """The checkpoint's state (unet, decoder, losses, seconds), checked against `cfg`."""
    return pretrained.load(
        checkpoint_path(cfg), KIND, fingerprint(cfg), CHECKPOINT_KEY,
        "The server trains it before round 1 (python -m simulation) and python -m "
        "reports.diffusion does too; on a separate device, copy the server's file to this "
        "path (node config diffusion-checkpoint).")
