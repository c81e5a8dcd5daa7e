"""Client-side defences of U-shaped split training against label leakage
(privacy/label_leakage.py), set in `privacy.split_defence`.

- Gaussian noise on the returned gradient: g + N(0, std^2 I), seeded per step. It
  hides the per-example direction at the price of noisier server-half updates.
- Label DP by randomized response (Ghazi et al., NeurIPS 2021, "RR"): each training
  label is kept with probability e^eps / (e^eps + K - 1) and otherwise replaced by
  one of the other K - 1 classes uniformly, once per example, so the labels the
  training ever sees are eps-label-DP; the gradients can then leak only those.
Neither is in a maintained library for this protocol, hence written here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gaussian_gradient_noise(grad: Tensor, std: float, generator: torch.Generator) -> Tensor:
    if std <= 0:
        return grad
    noise = torch.randn(grad.shape, generator=generator, dtype=grad.dtype)
    return grad + std * noise.to(grad.device)


def randomized_response(labels: Tensor, num_classes: int, epsilon: float,
                        generator: torch.Generator) -> Tensor:
    """Labels after K-ary randomized response at `epsilon` (one draw per example)."""
    keep_p = math.exp(epsilon) / (math.exp(epsilon) + num_classes - 1)
    keep = torch.rand(labels.shape, generator=generator) < keep_p
    # Another class, uniformly: shift by 1..K-1 modulo K.
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return torch.where(keep, labels, (labels + shift) % num_classes)
