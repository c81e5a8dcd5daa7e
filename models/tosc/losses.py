"""The paper's information-bottleneck distillation objective (Lightweight TOSC):

    L = task_weight * CE(y, s)                                  task
      + beta * KL(q(z|x) || N(0, I))                            information bottleneck
      + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))      distillation (Hinton et al.)
      + feature_weight * ||P h_s - h_t||^2                      optional feature matching

`distill_losses` returns the terms unweighted; the weights come from `distill:`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from models.tosc.config import DistillConfig
from models.tosc.model import TOSCOutput


def information_bottleneck_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)), summed over latent dims, mean over the
    batch: the rate term of the variational information bottleneck (Alemi et al. 2017),
    which the paper's IB loss weights by beta."""
    q = Normal(mu, torch.exp(0.5 * logvar))
    return kl_divergence(q, Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1).mean()


def distillation_kl(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(p_teacher^T || softmax(student / T)), mean over the batch (Hinton et al.
    2015). `teacher_probs` are already softened at T; zeros (logits outside the stored
    top-k) add nothing."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(log_q, teacher_probs, reduction="batchmean")


def softened_topk(values: Tensor, indices: Tensor, n_classes: int, temperature: float) -> Tensor:
    """Teacher probabilities at temperature T from stored top-k logits: softmax over the
    kept logits, zero elsewhere (exact when k equals the number of classes)."""
    logits = torch.full((values.shape[0], n_classes), float("-inf"), device=values.device)
    logits.scatter_(1, indices.long(), values.float())
    return torch.softmax(logits / temperature, dim=-1)


def distill_losses(out: TOSCOutput, label: Tensor, dc: DistillConfig,
                   teacher_probs: Tensor | None = None,
                   teacher_features: Tensor | None = None,
                   feature_proj: nn.Module | None = None) -> dict[str, Tensor]:
    """The terms of the IB distillation loss (module docstring), unweighted."""
    losses = {"task": F.cross_entropy(out.logits, label),
              "ib": information_bottleneck_kl(out.mu, out.logvar)}
    if teacher_probs is not None:
        losses["kd"] = distillation_kl(out.logits, teacher_probs, dc.temperature)
    if teacher_features is not None and feature_proj is not None:
        losses["feature"] = F.mse_loss(feature_proj(out.features), teacher_features.float())
    return losses
