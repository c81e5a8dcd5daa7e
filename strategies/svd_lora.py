"""SVD-LoRA: aggregate the exact LoRA update, then re-factorise it by truncated SVD.

Averaging the factors separately is not averaging the updates:
mean_k(B_k) @ mean_k(A_k) != mean_k(B_k @ A_k) in general (FedIT's error term;
FFA-LoRA avoids it by freezing A). This strategy averages the products instead,

    delta = sum_k p_k * (alpha / r_k) * B_k @ A_k,

with p_k the normalised ``num-examples`` weights and r_k each client's own rank, and
returns the best rank-R approximation of ``delta`` (Eckart-Young) as peft factors.
Since the products are what is averaged, clients may use different ranks. Related
work: FLoRA, and FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language
Models under Heterogeneous Tasks and Client Resources", 2024,
https://arxiv.org/abs/2402.11505), which re-factorises the weighted sum by SVD the
same way.

Clients may also hold only some of the modules (a compressed client keeps the first
layers of the shared LAM encoder, models/mtsc/compression.py). Each module is then
merged over the clients that hold it, with their weights renormalised among them, as
depth-wise heterogeneous FL averages each layer over its holders (InclusiveFL, Liu et
al., KDD 2022); a module no reply holds keeps the value sent. A module every client
holds is merged exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from .fedavg_lora import FedAvgLoRA
from .reply_checks import is_lora_a, lora_partner


class SVDLoRA(FedAvgLoRA):
    """Weighted mean of the LoRA products, re-factorised to rank ``target_rank``.

    Each module comes back as ``lora_A`` [R, in] and ``lora_B`` [out, R] such that
    ``(lora_alpha / R) * B @ A`` is the best rank-R approximation of the averaged
    update, components ordered by singular value (a client of smaller rank r keeps
    the first r). When the update has fewer than R components (R > min(out, in),
    or R > the sum of the client ranks) the rest are zero, so every module keeps
    the shape of rank R. Arrays that are not LoRA factors are averaged as in FedAvg.
    Assumes all clients use the same ``lora_alpha`` and peft's alpha / r scaling
    (not rsLoRA).

    Parameters
    ----------
    target_rank : int
        Rank R of the global factors.
    lora_alpha : float
        peft's ``lora_alpha`` of the clients.
    **kwargs
        Passed on to ``FedAvgLoRA`` (``max_update_bytes``) and Flower's ``FedAvg``.
    """

    # Clients may train at their own rank; the checks then only require that
    # a module's A and B agree on it.
    rank_flexible = True
    # Clients may leave out whole modules they do not hold; the others are merged.
    modules_flexible = True

    def __init__(self, *, target_rank: int, lora_alpha: float, **kwargs) -> None:
        if not isinstance(target_rank, int) or isinstance(target_rank, bool) or (
            target_rank < 1
        ):
            raise ValueError(
                f"target_rank must be an integer >= 1, got {target_rank!r}"
            )
        if not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {lora_alpha!r}")
        super().__init__(**kwargs)
        self.target_rank = target_rank
        self.lora_alpha = float(lora_alpha)

    def _aggregate_accepted(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Merge each module's products by SVD; average the metrics as FedAvg does."""
        contents = [msg.content for msg in accepted]
        records = [next(iter(c.array_records.values())) for c in contents]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        raw = np.array(
            [float(next(iter(c.metric_records.values()))[self.weighted_by_key])
             for c in contents]
        )
        # Every key the replies may hold: the first reply's, then those it left out.
        keys = list(records[0]) + [k for k in self._sent_arrays if k not in records[0]]

        merged: dict[str, np.ndarray] = {}
        for key in keys:
            holders = [i for i, r in enumerate(records) if key in r]
            if not holders:  # a module no client holds this round: as sent
                merged[key] = self._sent_arrays[key].numpy()
                continue
            weights = raw[holders] / raw[holders].sum()
            partner = lora_partner(key)
            if partner in keys:
                if is_lora_a(key):
                    merged[key], merged[partner] = merge_lora_products(
                        [records[i][key].numpy() for i in holders],
                        [records[i][partner].numpy() for i in holders],
                        weights,
                        self.lora_alpha,
                        self.target_rank,
                    )
            else:  # not a LoRA factor (e.g. a trained head): FedAvg
                values = [records[i][key].numpy() for i in holders]
                mean = sum(w * v.astype(np.float64) for w, v in zip(weights, values))
                merged[key] = mean.astype(values[0].dtype)

        # `merged` was filled pair by pair; give it back in the replies' key order.
        arrays = ArrayRecord({k: Array(merged[k]) for k in keys})
        return arrays, metrics


def merge_lora_products(
    a_factors: Sequence[np.ndarray],
    b_factors: Sequence[np.ndarray],
    weights: Sequence[float],
    lora_alpha: float,
    target_rank: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-R peft factors (A, B) of sum_k w_k (alpha / r_k) B_k @ A_k.

    Returns float32 ``A`` [R, in] and ``B`` [out, R] with
    ``(alpha / R) * B @ A`` = U_R S_R V_R^T, the truncated SVD of the sum.
    """
    if any(a.ndim != 2 for a in a_factors):
        raise ValueError(
            "SVD-LoRA merges 2-D LoRA factors (Linear layers); got A factors of "
            f"shapes {[a.shape for a in a_factors]}"
        )
    # The sum is one product of stacked factors, [w_k s_k B_k]_k @ [A_k]_k, of
    # rank <= K = sum r_k. QR of both sides reduces the SVD to a K x K core:
    # exact, and far cheaper than forming and decomposing the out x in matrix.
    b_cat = np.concatenate(
        [w * (lora_alpha / a.shape[0]) * b.astype(np.float64)
         for w, a, b in zip(weights, a_factors, b_factors)],
        axis=1,
    )
    a_cat = np.concatenate([a.astype(np.float64) for a in a_factors], axis=0)
    q_b, r_b = np.linalg.qr(b_cat)
    q_a, r_a = np.linalg.qr(a_cat.T)
    u_core, s, vt_core = np.linalg.svd(r_b @ r_a.T)
    u, vt = q_b @ u_core, vt_core @ q_a.T

    # Split each singular value evenly between B and A, and undo peft's scaling.
    keep = min(target_rank, s.size)
    root = np.sqrt(s[:keep] / (lora_alpha / target_rank))
    a_out = np.zeros((target_rank, a_cat.shape[1]))
    b_out = np.zeros((b_cat.shape[0], target_rank))
    a_out[:keep] = root[:, None] * vt[:keep]
    b_out[:, :keep] = u[:, :keep] * root
    return a_out.astype(np.float32), b_out.astype(np.float32)
