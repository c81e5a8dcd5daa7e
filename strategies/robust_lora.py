"""Byzantine-robust aggregation of LoRA adapters with Flower's own strategies.

Each class puts ``FedAvgLoRA``'s per-reply checks (NaN/Inf, shapes, dtypes, keys,
payload size) and its ``lora-train`` config in front of one of Flower's robust
strategies, which then aggregates the accepted replies coordinate by coordinate:

- ``FedMedianLoRA``: coordinate-wise median (Yin et al., "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates", ICML 2018).
- ``TrimmedAvgLoRA``: coordinate-wise trimmed mean, ``beta`` cut at each end (same paper).
- ``KrumLoRA``: the one update closest to its n - f - 2 nearest neighbours (Blanchard
  et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
  NeurIPS 2017).

The method resolution order does the wiring: ``FedAvgLoRA._aggregate_accepted`` calls
``super().aggregate_train``, which is the Flower strategy named second in each class.
These aggregate the factors A and B separately, as FedIT does; a median or a trimmed
mean of the factors is not the median of the products B @ A, but it bounds how far
one client can move each factor.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum

from .fedavg_lora import FedAvgLoRA


class FedMedianLoRA(FedAvgLoRA, FedMedian):
    """Coordinate-wise median of the accepted LoRA factors."""


class TrimmedAvgLoRA(FedAvgLoRA, FedTrimmedAvg):
    """Coordinate-wise trimmed mean of the accepted LoRA factors (``beta`` per end)."""


class KrumLoRA(FedAvgLoRA, Krum):
    """Krum over the accepted LoRA updates (``num_malicious_nodes`` tolerated)."""
