"""Label leakage in U-shaped split training (Li et al., "Label Leakage and Protection
in Two-party Split Learning", ICLR 2022).

In our U-shaped split the server computes the output of its half, the client computes
the loss with its labels, and the server receives g = dL/dh, the gradient with respect
to its output (fl_client/split_handlers.py, `train.split_output`). For a softmax cross-entropy
head that gradient carries (p - y) through the head's weights, so it depends on the
label. Two attacks score each example from g alone:

- norm: ||g_i||_2. Examples of a rare or hard class have larger gradients.
- direction (cosine): cos(g_i, g_ref), g_ref the gradient of one example whose label
  the attacker knows; examples of the same class point the same way.

The attacker knows one labelled example per class (the first of that class it sees in
a round) and, for the norm attack, uses it to pick the side (larger or smaller norms
mean "this class"). The auditor (not the attacker) knows every label and scores each
attack by its ROC AUC, one class against the rest (scikit-learn), per class and round.
AUC 0.5 is no leakage, 1.0 is every label exposed.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor

from common.records import Panel

PANELS = (Panel("label leakage AUC (split gradients)", ("leak_cosine_auc", "leak_norm_auc")),)


def norm_scores(grads: Tensor) -> Tensor:
    """||g_i||_2 of each row of [N, d] gradients."""
    return grads.norm(dim=1)


def cosine_scores(grads: Tensor, reference: Tensor) -> Tensor:
    """cos(g_i, g_ref) of each row of [N, d] gradients with one reference gradient."""
    return torch.nn.functional.cosine_similarity(grads, reference[None], dim=1, eps=1e-12)


def class_auc(scores: Tensor, labels: Tensor, cls: int) -> float | None:
    """ROC AUC of `scores` for "label == cls" against the rest; None if one side is empty."""
    positive = (labels == cls).numpy()
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, scores.numpy()))


def leakage_aucs(grads: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """Per-class AUCs of both attacks (keys `leak_{norm,cosine}_auc_class{c}`) and their
    means over the classes that could be scored (`leak_norm_auc`, `leak_cosine_auc`)."""
    grads, labels = grads.double(), labels.long()
    norms = norm_scores(grads)
    out: dict[str, float] = {}
    for c in range(num_classes):
        known = torch.nonzero(labels == c).flatten()
        if len(known) == 0:
            continue
        ref = int(known[0])  # the attacker's one labelled example of class c
        rest = torch.ones(len(labels), dtype=torch.bool)
        rest[ref] = False
        side = 1.0 if norms[ref] >= norms[rest].median() else -1.0
        for name, scores in (("norm", side * norms), ("cosine", cosine_scores(grads, grads[ref]))):
            auc = class_auc(scores[rest], labels[rest], c)
            if auc is not None:
                out[f"leak_{name}_auc_class{c}"] = auc
    for name in ("norm", "cosine"):
        values = [v for k, v in out.items() if k.startswith(f"leak_{name}_auc_class")]
        if values:
            out[f"leak_{name}_auc"] = float(np.mean(values))
    return out


class LabelLeakageProbe:
    """Collects what the server receives in a round (a row of the gradient w.r.t. its
    output per example) and scores it against the labels the auditor knows."""

    def __init__(self, label_row: int, num_classes: int, max_examples: int):
        self.label_row, self.num_classes, self.max_examples = label_row, num_classes, max_examples
        self.grads: dict[int, list[Tensor]] = {}
        self.labels: dict[int, list[Tensor]] = {}

    def observe(self, partition_id: int, grad_output: Tensor, labels: Tensor) -> None:
        """`grad_output` [B, Q, D] as received; `labels` [B] from the auditor."""
        kept = sum(len(g) for g in self.grads.get(partition_id, []))
        room = self.max_examples - kept
        if room <= 0:
            return
        row = grad_output[:room, self.label_row].detach().float().cpu()
        self.grads.setdefault(partition_id, []).append(row.flatten(1))
        self.labels.setdefault(partition_id, []).append(labels[:room].cpu())

    def round_metrics(self) -> dict[str, float]:
        """The attacks on each client's gradients of the round, averaged over clients
        (each client's gradients come from its own model state); then reset."""
        per_client = [leakage_aucs(torch.cat(self.grads[p]), torch.cat(self.labels[p]),
                                   self.num_classes) for p in sorted(self.grads)]
        self.grads, self.labels = {}, {}
        keys = sorted({k for m in per_client for k in m})
        return {k: float(np.mean([m[k] for m in per_client if k in m])) for k in keys}
