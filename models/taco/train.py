"""The taco system on a client, its local training and its evaluation over the link.

Local training (each round): the shared codec is fine-tuned on the client's images
(`taco.codec.local_epochs`, the loss of its pre-training), then the private task models
are trained on the client's labels, on the original images and on their full VQ
reconstructions D(Q(E(x))) (the receiver sees reconstructions), half of them mirrored.

Evaluation runs the TACO link on the client's test images: per image the transmitter
picks p by LSF and sends a real Flower message; the receiver decodes from that
message alone and classifies x_hat. Then the receiver switches task (segmentation of
the class it predicted), requests positions and decodes the transmitter's reply. On a
source without segmentation masks there is no segmenter and no switch (task.py
switch_mode): the rest runs as it does with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from common.config import ExperimentConfig
from common.data import num_classes, seg_classes
from common.seeding import seeded
from models.taco.codec import VQCodec, build_codec, codec_loss
from models.taco.config import TacoConfig
from models.taco.payload import message_bytes
from models.taco.pipeline import Receiver, Transmitter, switch_request
from models.taco.task import (
    SWITCH_FOREGROUND,
    Segmenter,
    TaskClassifier,
    gradcam_scores,
    segment,
    switch_mode,
)

# Parameter-name prefixes: the codec is shared, the task models are the client's own.
CODEC, PRIVATE = "codec.", ("classifier.", "segmenter.")


class TacoSystem(nn.Module):
    """The shared codec and the client's task models; `segmenter` is None on a source
    without segmentation masks (`switch` None: the task switch is off)."""

    def __init__(self, cfg: ExperimentConfig):
        super().__init__()
        classes = num_classes(cfg.data)
        self.switch = switch_mode(cfg.data)
        self.codec: VQCodec = build_codec(cfg)
        with seeded(cfg.seed + 11):
            self.classifier = TaskClassifier(cfg.taco.task_width, classes)
            # Its output: background and the masks' classes (the labels' on synthetic scenes).
            self.segmenter = (Segmenter(cfg.taco.seg_width, seg_classes(cfg.data) - 1)
                              if self.switch is not None else None)


def build(cfg: ExperimentConfig, device: torch.device | str = "cpu",
          lora_rank: int | None = None) -> TacoSystem:
    """Codec and task models, seeded (`lora_rank` belongs to the seam and is unused)."""
    return TacoSystem(cfg).to(device)


@torch.no_grad()
def reconstruct(codec: VQCodec, images: Tensor, batch_size: int = 128) -> Tensor:
    """D(Q(E(x))): the full VQ reconstruction."""
    codec.eval()
    return torch.cat([codec.decode(codec.indices(images[i:i + batch_size]))
                      for i in range(0, len(images), batch_size)])


def train_local(model: TacoSystem, data: Dataset, cfg: ExperimentConfig, lora_train: str = "ab",
                seed: int = 0, make_private=None) -> dict[str, float]:
    if make_private is not None:
        raise ValueError("privacy.dp.mode must be 'off' for workload 'taco'")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    c = cfg.taco.codec
    metrics: dict[str, float] = {}
    g = torch.Generator().manual_seed(seed)
    if c.local_epochs > 0:
        model.codec.train()
        opt = torch.optim.AdamW(model.codec.parameters(), lr=c.local_lr)
        sums, n = {}, 0
        for _ in range(c.local_epochs):
            for batch in DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True,
                                    generator=g):
                loss, parts = codec_loss(model.codec, batch["image"].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v * len(batch["image"])
                n += len(batch["image"])
        metrics.update({k: v / n for k, v in sums.items()})
    images = data.tensors["image"].to(device)
    recon = reconstruct(model.codec, images)
    labels = data.tensors["label"].to(device)
    segmenter = model.segmenter  # None: no masks, no second task to train
    segs = data.tensors["segmentation"].to(device) if segmenter is not None else None
    inputs = torch.cat([images, recon])
    params = list(model.classifier.parameters())
    if segmenter is not None:
        params += list(segmenter.parameters())
        segmenter.train()
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model.classifier.train()
    cls_sum = seg_sum = 0.0
    seen = 0
    for _ in range(cfg.train.local_epochs):
        order = torch.randperm(len(inputs), generator=g)
        for i in range(0, len(order), cfg.train.batch_size):
            idx = order[i:i + cfg.train.batch_size]
            x, y = inputs[idx], labels[idx % len(images)]
            # Mirror images: every label stays true (a mirrored shape is the same shape).
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None].to(device), x.flip(3), x)
            loss = cls_loss = F.cross_entropy(model.classifier(x), y)
            if segmenter is not None:
                s = segs[idx % len(images)]
                s = torch.where(flip[:, None, None].to(device), s.flip(2), s)
                seg_loss = F.cross_entropy(segmenter(x), s)
                loss = cls_loss + seg_loss
                seg_sum += seg_loss.item() * len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            cls_sum += cls_loss.item() * len(idx)
            seen += len(idx)
    metrics.update({"train_loss": cls_sum / seen, "num-examples": len(data)})
    if segmenter is not None:
        metrics["segmentation_loss"] = seg_sum / seen
    metrics.setdefault("codec_mse", 0.0)
    metrics.setdefault("codec_context_mse", 0.0)
    metrics.setdefault("codec_vq_loss", 0.0)
    return metrics


def _iou_parts(segmenter: Segmenter, image: Tensor, truth: Tensor, cls: int,
               foreground: bool = False) -> tuple[int, int]:
    pred = segment(segmenter(image).argmax(1)[0], cls, foreground)
    target = segment(truth, cls, foreground)
    return int((pred & target).sum()), int((pred | target).sum())


def image_quality(x_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image PSNR (dB) and SSIM (torchmetrics), images in [0, 1]."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    psnr = peak_signal_noise_ratio(x_hat, x, data_range=1.0, dim=(1, 2, 3), reduction="none")
    ssim = structural_similarity_index_measure(x_hat, x, data_range=1.0, reduction="none")
    return psnr, ssim


def evaluation_images(data: Dataset, t: TacoConfig) -> dict[str, Tensor]:
    """The first `taco.eval_images` test images with their labels and, where the source
    has them, their masks."""
    n = len(data) if t.eval_images is None else min(len(data), t.eval_images)
    return {k: data.tensors[k][:n] for k in ("image", "label", "segmentation")
            if k in data.tensors}


@torch.no_grad()
def evaluate(model: TacoSystem, data: Dataset, cfg: ExperimentConfig) -> dict[str, float]:
    """Per test image: LSF transmission over a Flower message, the receiver's accuracy,
    bytes, PSNR and SSIM; context-only and full-latent accuracy; the task switch (only
    where the model has a segmenter: the source has masks)."""
    t = cfg.taco
    K = t.codec.codebook_size
    model.eval()
    d = evaluation_images(data, t)
    images, labels, segs = d["image"], d["label"], d.get("segmentation")
    switch = model.segmenter is not None
    foreground = model.switch == SWITCH_FOREGROUND
    reference = model.classifier(images).argmax(-1)
    scores = gradcam_scores(model.classifier, images, reference)
    out: dict[str, list] = {k: [] for k in ("correct", "bytes", "rate", "exact", "context",
                                            "full", "switch_bytes")}
    hats, inter_before, union_before, inter_after, union_after = [], 0, 0, 0, 0
    for i in range(len(images)):
        x = images[i:i + 1]
        tx = Transmitter(model.codec, model.classifier, x, scores[i], K)
        sent = tx.lsf(t.rates, t.lsf_rule, t.lsf_tolerance, t.lsf_fallback)
        rx = Receiver(model.codec, tx.grid)
        x_hat = rx.receive_message(sent.message, K)  # from the message's content alone
        predicted = int(model.classifier(x_hat).argmax())
        out["correct"].append(predicted == int(labels[i]))
        out["bytes"].append(message_bytes(sent.message))
        out["rate"].append(sent.payload.rate)
        out["exact"].append(torch.equal(x_hat, sent.image))
        out["context"].append(int(tx.at_rate(0).logits.argmax()) == int(labels[i]))
        out["full"].append(int(tx.at_rate(100).logits.argmax()) == int(labels[i]))
        hats.append(x_hat)
        if not switch:
            continue
        # Task switch: segment the predicted class; request what it needs.
        a, b = _iou_parts(model.segmenter, x_hat, segs[i], predicted, foreground)
        inter_before, union_before = inter_before + a, union_before + b
        request = switch_request(model.segmenter, x_hat, predicted, t.switch_confidence,
                                 foreground)
        reply = tx.answer_request(request, rx.sent)
        x_more = rx.receive_message(reply, K)
        out["switch_bytes"].append(message_bytes(reply))
        a, b = _iou_parts(model.segmenter, x_more, segs[i], predicted, foreground)
        inter_after, union_after = inter_after + a, union_after + b
    psnr, ssim = image_quality(torch.cat(hats), images)
    mean = lambda v: float(sum(v)) / len(v)  # noqa: E731
    counts = torch.bincount(labels)
    metrics = {
        "accuracy": mean(out["correct"]),
        "accuracy_original": float((reference == labels).float().mean()),
        "accuracy_context": mean(out["context"]),
        "accuracy_full": mean(out["full"]),
        "kb_per_image": mean(out["bytes"]) / 1000,
        "lsf_rate": mean(out["rate"]),
        "receiver_exact": mean(out["exact"]),
        "psnr": float(psnr.mean()), "ssim": float(ssim.mean()),
        "majority_class_share": counts.max().item() / len(labels),
        "num-examples": len(images),
    }
    if switch:
        metrics.update({"switch_iou_before": inter_before / max(union_before, 1),
                        "switch_iou_after": inter_after / max(union_after, 1),
                        "switch_extra_kb": mean(out["switch_bytes"]) / 1000})
    return metrics
