"""FedAvg and FedProx of distilled student weights (the `tosc` workload).

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017 (https://arxiv.org/abs/1602.05629), and Li et al., "Federated
Optimization in Heterogeneous Networks", MLSys 2020 (https://arxiv.org/abs/1812.06127).
Clients send every student weight except their task head; the server averages them
weighted by the number of training examples. FedProx is Flower's ``FedProx``: the same
server side, plus ``"proximal-mu"`` in the train config; the clients add
(mu/2)||w - w_global||^2 to their local loss (``models.tosc.train.train_local``).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx

from .fedavg_lora import FedAvgLoRA


class StudentFedAvg(FedAvgLoRA):
    """Flower's FedAvg of the student weights, with the per-reply checks and traffic
    metrics of ``FedAvgLoRA`` (whose averaging of every array is plain FedAvg).

    The ``"lora-train"`` entry it sends is ignored by a workload without LoRA.
    """


class StudentFedProx(StudentFedAvg, FedProx):
    """Flower's FedProx of the student weights, with the same reply checks.

    Parameters
    ----------
    proximal_mu : float
        Weight of the proximal term the clients add to their local loss.
    **kwargs
        See ``FedAvgLoRA`` and Flower's ``FedAvg``.
    """
