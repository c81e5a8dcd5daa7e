"""Server strategies for federated LoRA fine-tuning (Flower message API)."""

from __future__ import annotations

from typing import Any

from .fedavg_lora import FedAvgLoRA
from .ffa_lora import FFALoRA
from .svd_lora import SVDLoRA

STRATEGIES: dict[str, type[FedAvgLoRA]] = {
    "fedavg_lora": FedAvgLoRA,
    "ffa_lora": FFALoRA,
    "svd_lora": SVDLoRA,
}

# Only svd_lora re-factorises the update; the other strategies accept these keys
# (and ignore them) so that one experiment config can build any of them.
_SVD_ONLY = ("target_rank", "lora_alpha")


def build_strategy(name: str, **kwargs: Any) -> FedAvgLoRA:
    """Build the strategy called ``name`` with ``kwargs``.

    ``svd_lora`` needs ``target_rank`` and ``lora_alpha``; ``fedavg_lora`` and
    ``ffa_lora`` ignore them. Everything else goes to the strategy's constructor
    (``max_update_bytes`` and Flower ``FedAvg``'s arguments).
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}."
        )
    cls = STRATEGIES[name]
    if cls is not SVDLoRA:
        for key in _SVD_ONLY:
            kwargs.pop(key, None)
    return cls(**kwargs)


__all__ = ["FedAvgLoRA", "FFALoRA", "SVDLoRA", "STRATEGIES", "build_strategy"]
