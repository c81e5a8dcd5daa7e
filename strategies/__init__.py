"""Server strategies (Flower message API): federated LoRA fine-tuning, and FedAvg /
FedProx of distilled student weights."""

from __future__ import annotations

from typing import Any

from .fedavg_lora import FedAvgLoRA
from .ffa_lora import FFALoRA
from .student_fedavg import StudentFedAvg, StudentFedProx
from .svd_lora import SVDLoRA

STRATEGIES: dict[str, type[FedAvgLoRA]] = {
    "fedavg_lora": FedAvgLoRA,
    "ffa_lora": FFALoRA,
    "svd_lora": SVDLoRA,
    "fedavg": StudentFedAvg,
    "fedprox": StudentFedProx,
}

# Keys only some strategies take; the others accept them (and ignore them) so that
# one experiment config can build any of them.
_ONLY_FOR = {"target_rank": SVDLoRA, "lora_alpha": SVDLoRA, "proximal_mu": StudentFedProx}


def build_strategy(name: str, **kwargs: Any) -> FedAvgLoRA:
    """Build the strategy called ``name`` with ``kwargs``.

    ``svd_lora`` needs ``target_rank`` and ``lora_alpha`` and ``fedprox`` takes
    ``proximal_mu``; the other strategies ignore them. Everything else goes to the
    strategy's constructor (``max_update_bytes`` and Flower ``FedAvg``'s arguments).
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}."
        )
    cls = STRATEGIES[name]
    for key, owner in _ONLY_FOR.items():
        if cls is not owner:
            kwargs.pop(key, None)
    return cls(**kwargs)


__all__ = ["FedAvgLoRA", "FFALoRA", "SVDLoRA", "StudentFedAvg", "StudentFedProx",
           "STRATEGIES", "build_strategy"]
