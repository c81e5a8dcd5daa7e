"""Local training and evaluation of the diffusion workload.

Local training, one pass per batch: the DDPM loss on the client's own scenes trains the
UNet's LoRA adapters (the shared part); cross-entropy on its own masks trains the
segmentation net, the classes present in them the CAM classifier; the receiver's task
net learns segmentation, depth (where the source has it) and the main object class
(classes.main_object) from the real images. Evaluation runs the three-phase link on
the client's test scenes and scores the receiver's tasks on the reconstructions
(`task_scores`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from common.config import ExperimentConfig
from common.seeding import seeded
from models.diffusion.classes import MaskClasses, main_object, mask_classes
from models.diffusion.ddpm import denoising_loss, noise_scheduler, training_conditions
from models.diffusion.link import FEEDBACK, PHASE1, PHASE3, LinkResult, three_phase_link
from models.diffusion.model import DiffusionSemCom, presence, private_parameters, set_trainable


def class_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy on the scenes with a main object (target >= 0; classes.main_object)."""
    valid = target >= 0
    if bool(valid.all()):
        return F.cross_entropy(logits, target)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid], target[valid])


def receiver_task_loss(model: DiffusionSemCom, image: Tensor, seg: Tensor,
                       depth: Tensor | None, label: Tensor) -> Tensor:
    """The receiver's task losses: segmentation, depth (none without depth maps) and the
    main object class `label`."""
    seg_logits, depth_pred, class_logits = model.task_net(image)
    loss = F.cross_entropy(seg_logits, seg)
    if depth is not None:
        loss = loss + F.l1_loss(depth_pred, depth)
    return loss + class_loss(class_logits, label)


def classifier_loss(model: DiffusionSemCom, image: Tensor, seg: Tensor) -> Tensor:
    """Multi-label BCE of the CAM classifier on the classes present in each scene."""
    logits = model.classifier(image)
    return F.binary_cross_entropy_with_logits(logits, presence(seg, logits.shape[1]))


def private_losses(model: DiffusionSemCom, image: Tensor, seg: Tensor, depth: Tensor | None,
                   label: Tensor) -> dict[str, Tensor]:
    """The private nets' losses on the client's own labels: the transmitter's
    segmentation net and CAM classifier, the receiver's task net."""
    return {"loss_segnet": F.cross_entropy(model.seg_net(image), seg),
            "loss_classifier": classifier_loss(model, image, seg),
            "loss_receiver": receiver_task_loss(model, image, seg, depth, label)}


def batch_targets(batch: dict[str, Tensor], classes: MaskClasses, device
                  ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(image, segmentation, depth or None, main object class) of a batch on `device`."""
    depth = batch["depth"].to(device) if classes.depth else None
    return (batch["image"].to(device), batch["segmentation"].to(device), depth,
            main_object(batch, classes).to(device))


def train_local(model: DiffusionSemCom, data: Dataset, cfg: ExperimentConfig,
                lora_train: str = "ab", seed: int = 0, make_private=None) -> dict[str, float]:
    """`train.local_epochs` of AdamW: LoRA at train.lr, private nets at diffusion.private_lr."""
    if make_private is not None:
        raise ValueError("privacy.dp.mode=local is not built for workload 'diffusion'")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    set_trainable(model, lora_train)
    device = next(model.parameters()).device
    lora = [p for p in model.unet.parameters() if p.requires_grad]
    private = private_parameters(model)
    opt = torch.optim.AdamW([{"params": lora, "lr": cfg.train.lr},
                             {"params": private, "lr": cfg.diffusion.private_lr}],
                            weight_decay=cfg.train.weight_decay)
    scheduler = noise_scheduler(cfg.diffusion)
    loader = DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    classes = mask_classes(cfg.data)
    model.train()
    sums: dict[str, float] = {}
    n_seen = 0
    for _ in range(cfg.train.local_epochs):
        for batch in loader:
            image, seg, depth, label = batch_targets(batch, classes, device)
            cond = training_conditions(image, seg, cfg.diffusion, g, classes.count)
            losses = {
                "loss_denoise": denoising_loss(model.unet, image, cond, scheduler, g),
                **private_losses(model, image, seg, depth, label),
            }
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n = len(image)
            n_seen += n
            sums["train_loss"] = sums.get("train_loss", 0.0) + loss.item() * n
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item() * n
    metrics = {k: v / n_seen for k, v in sums.items()}
    _train_private(model, data, cfg, seed)
    metrics["num-examples"] = len(data)
    return metrics


def _train_private(model: DiffusionSemCom, data: Dataset, cfg: ExperimentConfig,
                   seed: int) -> None:
    """`diffusion.private_epochs` more passes that train only the private nets (the
    DDPM step dominates a joint pass; these nets need tens of epochs to leave the
    background). Their losses are not reported: the message audit admits a fixed set
    of metric names, and the joint pass's losses already show these nets' trend."""
    epochs = cfg.diffusion.private_epochs
    if epochs == 0:
        return
    device = next(model.parameters()).device
    classes = mask_classes(cfg.data)
    nets = (model.seg_net, model.classifier, model.task_net)
    opt = torch.optim.AdamW(private_parameters(model),
                            lr=cfg.diffusion.private_lr, weight_decay=cfg.train.weight_decay)
    loader = DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed + 1))
    for m in nets:
        m.train()
    for _ in range(epochs):
        for batch in loader:
            image, seg, depth, label = batch_targets(batch, classes, device)
            loss = sum(private_losses(model, image, seg, depth, label).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def task_scores(model: DiffusionSemCom, recon: Tensor, batch: dict[str, Tensor],
                requested: Tensor, classes: MaskClasses) -> dict[str, float]:
    """Sums over the batch of what the receiver's tasks score on reconstructions, to be
    pooled by `pooled_scores`: the requested class's intersection and union (IoU over
    the whole test set, so scenes without that class count through their false
    positives), depth errors where the source has depth (RMSE; scale-invariant RMSE of
    Eigen et al. 2014: sqrt(mean(d^2) - mean(d)^2), d = log pred - log true), hits on
    the main object class (over the scenes that have one), PSNR and SSIM against the
    originals."""
    model.eval()
    seg_logits, depth_pred, class_logits = model.task_net(recon)
    pred = seg_logits.argmax(1)
    target = (batch["segmentation"] == (requested + 1)[:, None, None])
    got = pred == (requested + 1)[:, None, None]
    image = batch["image"]
    out = {"inter": (got & target).sum().item(), "union": (got | target).sum().item()}
    if classes.depth:
        depth = batch["depth"]
        d = torch.log(depth_pred) - torch.log(depth)
        si = torch.sqrt((d ** 2).mean((1, 2)) - d.mean((1, 2)) ** 2).clamp_min(0)
        out["sq_depth"] = ((depth_pred - depth) ** 2).mean((1, 2)).sum().item()
        out["si_rmse"] = si.sum().item()
    main = main_object(batch, classes)
    return out | {
        "correct": (class_logits.argmax(1) == main).sum().item(),
        "n_class": (main >= 0).sum().item(),
        "psnr": sum(peak_signal_noise_ratio(r[None], x[None], data_range=1.0).item()
                    for r, x in zip(recon, image)),
        "ssim": structural_similarity_index_measure(recon, image, data_range=1.0,
                                                    reduction="sum").item(),
        "n": len(image),
    }


def pooled_scores(parts: list[dict[str, float]]) -> dict[str, float]:
    """IoU, depth errors (where scored), accuracy, PSNR and SSIM over `task_scores`' sums."""
    tot = {k: sum(p[k] for p in parts) for k in parts[0]}
    n = tot["n"]
    out = {"iou": tot["inter"] / max(tot["union"], 1)}
    if "sq_depth" in tot:
        out |= {"depth_rmse": math.sqrt(tot["sq_depth"] / n), "depth_si_rmse": tot["si_rmse"] / n}
    return out | {"accuracy": tot["correct"] / max(tot["n_class"], 1),
                  "psnr": tot["psnr"] / n, "ssim": tot["ssim"] / n}


def raw_image_bits(image_size: int) -> int:
    """Bits of the raw image the compression rates divide by (8-bit RGB)."""
    return 3 * image_size ** 2 * 8


def link_metrics(results: list[tuple[LinkResult, dict[str, Tensor], DiffusionSemCom]],
                 cfg: ExperimentConfig) -> dict[str, float]:
    """Per-phase task scores and bytes per image of runs of the link, each scored by the
    task net of the client that ran it, pooled over all of them."""
    classes = mask_classes(cfg.data)
    n = sum(len(r.requested) for r, _, _ in results)
    s1 = pooled_scores([task_scores(m, r.recon1, b, r.requested, classes) for r, b, m in results])
    s3 = pooled_scores([task_scores(m, r.recon3, b, r.requested, classes) for r, b, m in results])
    bytes1 = sum(r.nbytes(PHASE1) for r, _, _ in results) / n
    bytes3 = sum(r.nbytes(PHASE3) for r, _, _ in results) / n
    out = {f"{k}_phase1": v for k, v in s1.items()} | {f"{k}_phase3": v for k, v in s3.items()}
    out.update({
        "iou_gain": s3["iou"] - s1["iou"],
        "bytes_phase1": bytes1,
        "bytes_feedback": sum(r.nbytes(FEEDBACK) for r, _, _ in results) / n,
        "bytes_phase3": bytes3,
        "rate_phase1": 8 * bytes1 / raw_image_bits(cfg.data.image_size),
        "rate_phase3": 8 * (bytes1 + bytes3) / raw_image_bits(cfg.data.image_size),  # cumulative after phase 3
        "edge_patches": sum(r.patches() for r, _, _ in results) / n,
        # The request is the main object class (the synthetic scenes' label).
        "feedback_is_label": sum((r.requested == main_object(b, classes)).sum().item()
                                 for r, b, _ in results) / n,
        "num-examples": n,
    })
    return out


def eval_batches(data: Dataset, cfg: ExperimentConfig, device) -> list[dict[str, Tensor]]:
    """The first diffusion.eval_samples test scenes, in batches of train.batch_size."""
    n = min(len(data), cfg.diffusion.eval_samples)
    loader = DataLoader(torch.utils.data.Subset(data, range(n)), batch_size=cfg.train.batch_size)
    return [{k: v.to(device) for k, v in b.items()} for b in loader]


def evaluate(model: DiffusionSemCom, data: Dataset, cfg: ExperimentConfig) -> dict[str, float]:
    """The three-phase link at diffusion.tau with diffusion.attention on the client's
    first test scenes."""
    device = next(model.parameters()).device
    with seeded(cfg.seed):
        results = [(three_phase_link(model, b["image"], cfg, cfg.diffusion.tau,
                                     cfg.diffusion.attention, seed=cfg.seed + i), b, model)
                   for i, b in enumerate(eval_batches(data, cfg, device))]
        return link_metrics(results, cfg)
