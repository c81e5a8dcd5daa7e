"""What the `mtsc` workload measures: task metrics on receiver outputs, and the
names the round loop records and plots (LAM-MTSC's four tasks)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.functional.text import bleu_score

from common.config import ExperimentConfig
from common.data import text_vocab
from common.records import Panel
from models.mtsc.model import Q_CAP, Q_CLS, Q_VQA, TaskDecoders

# Recorded from the aggregated client metrics into each round's row.
TRAIN_METRICS = ("symbols_per_example",)
EVAL_METRICS = ("accuracy", "vqa_accuracy", "bleu", "psnr", "majority_class_share")
# The round's one-line summary, and the plots of metrics.png.
SUMMARY = {"accuracy": "acc {:.3f}", "vqa_accuracy": "vqa {:.3f}", "bleu": "bleu {:.3f}",
           "psnr": "psnr {:.1f} dB"}
PANELS = (
    Panel("accuracy", ("accuracy", "vqa_accuracy"), reference=("majority_class_share",)),
    Panel("caption BLEU-4", ("bleu",)),
    Panel("reconstruction PSNR (dB)", ("psnr",)),
    Panel("channel symbols per example", ("symbols_per_example",)),
)


class TaskScorer:
    """Task metrics accumulated over batches of receiver outputs `h` and their labels.

    accuracy (classification), vqa_accuracy, bleu (BLEU-4, smoothed, greedy captions),
    psnr (dB, images in [0, 1]) and majority_class_share: the accuracy a constant
    guess of the most common local test label would get, to read accuracy against
    (only where the source has labels). Captions are decoded with the source's
    vocabulary (`text_vocab`).
    """

    def __init__(self, cfg: ExperimentConfig):
        self.tasks, self.weights = cfg.model.tasks, cfg.train.loss_weights
        self.vocab = text_vocab(cfg.data)
        self.n, self.loss, self.correct, self.vqa_correct, self.psnr = 0, 0.0, 0, 0, 0.0
        self.hyps: list[str] = []
        self.refs: list[list[str]] = []
        self.labels: list[Tensor] = []

    def add(self, heads: TaskDecoders, h: Tensor, batch: dict[str, Tensor]) -> None:
        n = batch["image"].shape[0]
        losses = heads.losses(h, batch)
        self.loss += sum(self.weights.get(t, 1.0) * v for t, v in losses.items()).item() * n
        self.n += n
        if "label" in batch:
            self.labels.append(batch["label"].cpu())
        if "classification" in self.tasks:
            pred = heads.classification(h[:, Q_CLS]).argmax(-1)
            self.correct += (pred == batch["label"]).sum().item()
        if "vqa" in self.tasks:
            self.vqa_correct += (heads.vqa(h[:, Q_VQA]).argmax(-1) == batch["answer"]).sum().item()
        if "captioning" in self.tasks:
            gen = heads.captioning.generate(h[:, Q_CAP], batch["caption"].shape[1])
            self.hyps += [self.vocab.decode(g.tolist()) for g in gen]
            self.refs += [[self.vocab.decode(c.tolist())] for c in batch["caption"]]
        if "reconstruction" in self.tasks:
            rec = heads.reconstruct(h).clamp(0.0, 1.0)
            self.psnr += peak_signal_noise_ratio(rec, batch["image"], data_range=1.0,
                                                 reduction="sum", dim=(1, 2, 3)).item()

    def result(self) -> dict[str, float]:
        out = {"loss": self.loss / self.n, "num-examples": self.n}
        if self.labels:
            counts = torch.bincount(torch.cat(self.labels))
            out["majority_class_share"] = counts.max().item() / self.n
        if "classification" in self.tasks:
            out["accuracy"] = self.correct / self.n
        if "vqa" in self.tasks:
            out["vqa_accuracy"] = self.vqa_correct / self.n
        if "captioning" in self.tasks:
            out["bleu"] = float(bleu_score(self.hyps, self.refs, n_gram=4, smooth=True))
        if "reconstruction" in self.tasks:
            out["psnr"] = self.psnr / self.n
        return out
