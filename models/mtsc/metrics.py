"""What the `mtsc` workload measures: task metrics on receiver outputs, and the
names the round loop records and plots (LAM-MTSC's four tasks).

LAM-MTSC scores VQA with BLEU and captioning with CIDEr (Sec. V). CIDEr here is
CIDEr-D (Vedantam et al., CVPR 2015, Sec. 8): pycocoevalcap's `Cider` scorer, which
clips each n-gram's TF-IDF weight at the reference's and applies the Gaussian length
penalty (sigma = 6), on the project's own word tokens (the source's `TextVocab`), not
on the PTB tokenizer (it needs Java). CIDEr's IDF is taken over the references of the
corpus being scored, so a corpus is scored at once, never batch by batch.
"""

from __future__ import annotations

import torch
from pycocoevalcap.cider.cider import Cider
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.functional.text import bleu_score

from common.config import ExperimentConfig
from common.data import text_vocab
from common.records import Panel
from models.mtsc.model import Q_CAP, Q_CLS, Q_VQA, TaskDecoders

# Recorded from the aggregated client metrics into each round's row.
TRAIN_METRICS = ("symbols_per_example",)
EVAL_METRICS = ("accuracy", "vqa_accuracy", "bleu", "psnr", "majority_class_share", "cider",
                "vqa_bleu")
# The round's one-line summary, and the plots of metrics.png.
SUMMARY = {"accuracy": "acc {:.3f}", "vqa_accuracy": "vqa {:.3f}", "bleu": "bleu {:.3f}",
           "cider": "cider {:.2f}", "psnr": "psnr {:.1f} dB"}
PANELS = (
    Panel("accuracy (VQA: also BLEU-1)", ("accuracy", "vqa_accuracy", "vqa_bleu"),
          reference=("majority_class_share",)),
    Panel("caption BLEU-4", ("bleu",)),
    Panel("caption CIDEr-D", ("cider",)),
    Panel("reconstruction PSNR (dB)", ("psnr",)),
    Panel("channel symbols per example", ("symbols_per_example",)),
)


def cider(hyps: list[str], refs: list[list[str]]) -> float:
    """CIDEr-D of a corpus: hypothesis i (space-separated words) against its references
    refs[i], on pycocoevalcap's scale (0 .. 10; good COCO captioners score about 1).
    The IDF comes from these references, so pass the whole corpus at once."""
    if len(hyps) != len(refs):
        raise ValueError(f"cider: {len(hyps)} hypotheses but {len(refs)} reference lists; "
                         "give one list of references per hypothesis")
    if not any(ref.split() for rs in refs for ref in rs):
        return 0.0  # no reference n-gram to weigh (pycocoevalcap would fail on it)
    score, _ = Cider().compute_score({i: list(rs) for i, rs in enumerate(refs)},
                                     {i: [h] for i, h in enumerate(hyps)})
    return float(score)


def vqa_bleu(answers: list[str], refs: list[str]) -> float:
    """Corpus BLEU-1 of the predicted answers against the true ones (clipped unigram
    precision with the brevity penalty). Answers are a few words, so higher-order
    n-grams would make BLEU 0 for every one-word answer; on one-word answers BLEU-1
    is the accuracy."""
    return float(bleu_score(answers, [[r] for r in refs], n_gram=1))


class TaskScorer:
    """Task metrics accumulated over batches of receiver outputs `h` and their labels.

    accuracy (classification), vqa_accuracy, vqa_bleu (`vqa_bleu`), bleu (BLEU-4,
    smoothed, greedy captions), cider (CIDEr-D, `cider`, over everything added), psnr
    (dB, images in [0, 1]) and majority_class_share: the accuracy a constant guess of
    the most common local test label would get, to read accuracy against (only where
    the source has labels). Captions and answers are decoded with the source's
    vocabulary (`text_vocab`). In a round's row, cider is each client's CIDEr-D over
    its own test split, averaged by examples.
    """

    def __init__(self, cfg: ExperimentConfig):
        self.tasks, self.weights = cfg.model.tasks, cfg.train.loss_weights
        self.vocab = text_vocab(cfg.data)
        self.n, self.loss, self.correct, self.vqa_correct, self.psnr = 0, 0.0, 0, 0, 0.0
        self.hyps: list[str] = []
        self.refs: list[list[str]] = []
        self.answers: list[str] = []
        self.true_answers: list[str] = []
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
            pred = heads.vqa(h[:, Q_VQA]).argmax(-1)
            self.vqa_correct += (pred == batch["answer"]).sum().item()
            self.answers += [self.vocab.answers[i] for i in pred.tolist()]
            self.true_answers += [self.vocab.answers[i] for i in batch["answer"].tolist()]
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
            out["vqa_bleu"] = vqa_bleu(self.answers, self.true_answers)
        if "captioning" in self.tasks:
            out["bleu"] = float(bleu_score(self.hyps, self.refs, n_gram=4, smooth=True))
            out["cider"] = cider(self.hyps, self.refs)
        if "reconstruction" in self.tasks:
            out["psnr"] = self.psnr / self.n
        return out
