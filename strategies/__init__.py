"""Server strategies (Flower message API): federated LoRA fine-tuning, and FedAvg /
FedProx of distilled student weights."""

from __future__ import annotations

from typing import Any

from .fedavg_lora import FedAvgLoRA
from .ffa_lora import FFALoRA
from .robust_lora import FedMedianLoRA, KrumLoRA, TrimmedAvgLoRA
from .student_fedavg import StudentFedAvg, StudentFedProx
from .svd_lora import SVDLoRA

STRATEGIES: dict[str, type[FedAvgLoRA]] = {
    "fedavg_lora": FedAvgLoRA,
    "ffa_lora": FFALoRA,
    "svd_lora": SVDLoRA,
    "fedavg": StudentFedAvg,
    "fedprox": StudentFedProx,
    "fedmedian_lora": FedMedianLoRA,
    "trimmed_avg_lora": TrimmedAvgLoRA,
    "krum_lora": KrumLoRA,
}

# Keys only some strategies take; the others accept them (and ignore them) so that
# one experiment config can build any strategy.
_ONLY_FOR = {
    "target_rank": (SVDLoRA,),
    "lora_alpha": (SVDLoRA,),
    "proximal_mu": (StudentFedProx,),
    "trim_beta": (TrimmedAvgLoRA,),
    "num_malicious_nodes": (KrumLoRA,),
}


def build_strategy(name: str, **kwargs: Any) -> FedAvgLoRA:
    """Build the strategy called ``name`` with ``kwargs``.

    ``svd_lora`` needs ``target_rank`` and ``lora_alpha``, ``fedprox`` takes
    ``proximal_mu``, ``trimmed_avg_lora`` ``trim_beta`` (Flower's ``beta``) and
    ``krum_lora`` ``num_malicious_nodes``; the other strategies ignore these.
    Everything else goes to the strategy's constructor (``max_update_bytes`` and
    Flower ``FedAvg``'s arguments).
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


__all__ = ["FedAvgLoRA", "FFALoRA", "SVDLoRA", "StudentFedAvg", "StudentFedProx",
           "FedMedianLoRA", "TrimmedAvgLoRA", "KrumLoRA", "STRATEGIES", "build_strategy"]
