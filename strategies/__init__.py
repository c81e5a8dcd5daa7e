"""Server strategies for federated LoRA fine-tuning (Flower message API)."""

from __future__ import annotations

from typing import Any

from .fedavg_lora import FedAvgLoRA
from .ffa_lora import FFALoRA
from .robust_lora import FedMedianLoRA, KrumLoRA, TrimmedAvgLoRA
from .svd_lora import SVDLoRA

STRATEGIES: dict[str, type[FedAvgLoRA]] = {
    "fedavg_lora": FedAvgLoRA,
    "ffa_lora": FFALoRA,
    "svd_lora": SVDLoRA,
    "fedmedian_lora": FedMedianLoRA,
    "trimmed_avg_lora": TrimmedAvgLoRA,
    "krum_lora": KrumLoRA,
}

# Keys only some strategies take; the others accept them (and ignore them) so that
# one experiment config can build any strategy.
_ONLY_FOR = {
    "target_rank": (SVDLoRA,),
    "lora_alpha": (SVDLoRA,),
    "trim_beta": (TrimmedAvgLoRA,),
    "num_malicious_nodes": (KrumLoRA,),
}


def build_strategy(name: str, **kwargs: Any) -> FedAvgLoRA:
    """Build the strategy called ``name`` with ``kwargs``.

    ``svd_lora`` needs ``target_rank`` and ``lora_alpha``; ``trimmed_avg_lora``
    takes ``trim_beta`` (Flower's ``beta``) and ``krum_lora`` ``num_malicious_nodes``;
    the other strategies ignore these. Everything else goes to the strategy's
    constructor (``max_update_bytes`` and Flower ``FedAvg``'s arguments).
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}."
        )
    cls = STRATEGIES[name]
    for key, users in _ONLY_FOR.items():
        if key in kwargs and cls not in users:
            kwargs.pop(key)
    if "trim_beta" in kwargs:
        kwargs["beta"] = kwargs.pop("trim_beta")
    return cls(**kwargs)


__all__ = ["FedAvgLoRA", "FFALoRA", "SVDLoRA", "FedMedianLoRA", "TrimmedAvgLoRA",
           "KrumLoRA", "STRATEGIES", "build_strategy"]
