"""The `mtsc` workload's seam (models/seam.py): what the server, the client and the
strategies call, and nothing else of the package. The LoRA adapters are the only tensors
that leave a client (`shared_state`)."""

from __future__ import annotations

import math

import numpy as np
import torch
from peft import get_peft_model_state_dict
from torch import Tensor, nn
from torch.utils.data import Dataset

from common.config import ExperimentConfig
from common.data import load_partition
from models.mtsc.metrics import EVAL_METRICS, PANELS, SUMMARY, TRAIN_METRICS, TaskScorer
from models.mtsc.model import MTSCModel, build, data_needs, set_trainable
from models.mtsc.split import LABEL_ROW, client_parameters, server_forward, server_half
from models.mtsc.train import autocast_dtype, class_logits, eval_batches, evaluate, train_local

__all__ = ["build", "shared_state", "load_shared_state", "load_data", "train_local",
           "evaluate", "prepare", "class_logits", "TRAIN_METRICS", "EVAL_METRICS", "SUMMARY",
           "PANELS",
           # split training (fl_client/split_handlers.py, fl_server/split_loop.py)
           "set_trainable", "client_parameters", "server_half", "server_forward",
           "eval_batches", "TaskScorer", "autocast_dtype", "LABEL_ROW"]


def prepare(cfg: ExperimentConfig) -> None:
    """Nothing to pre-train: the LAM is built from its config (seeded) or loaded from the
    local `model.checkpoint` by every party."""


def load_data(cfg: ExperimentConfig, partition_id: int, num_partitions: int
              ) -> tuple[Dataset, Dataset]:
    """The client's local (train, test) split, captions cut to `model.caption_len`.
    Fails, naming the task, the column and how to add it, when the source lacks what
    one of `model.tasks` needs (labels, captions, questions and answers)."""
    return load_partition(cfg.data, partition_id, num_partitions, cfg.model.caption_len,
                          needs=data_needs(cfg))


def _lora_modules(model: MTSCModel) -> dict[str, nn.Module]:
    return {"encoder": model.transmitter.lam_encoder, "decoder": model.receiver.lam_decoder}


def shared_state(model: MTSCModel, lora_train: str = "ab",
                 client_half_only: bool = False) -> dict[str, np.ndarray]:
    """The only tensors that may leave a client: LoRA adapters (only B for FFA-LoRA).
    In split training the client holds only the encoder's (`client_half_only`)."""
    out = {}
    for prefix, module in _lora_modules(model).items():
        if client_half_only and prefix != "encoder":
            continue
        for key, value in get_peft_model_state_dict(module).items():
            if lora_train == "b" and "lora_A" in key:
                continue
            out[f"{prefix}.{key}"] = value.detach().cpu().float().numpy()
    return out


def _fit_rank(a: Tensor, b: Tensor, local_a: Tensor) -> tuple[Tensor, Tensor]:
    """Map rank-R factors (SVD-ordered, scaling alpha/R) onto a local rank r.

    (alpha/r) B_r A_r = (alpha/R) B[:, :r] A[:r] needs both factors scaled by sqrt(r/R).
    Components that carry nothing (zero B column; for r > R the extra ones, or the
    zero padding svd_lora adds when the update has fewer than R components) get the
    local A row back: the product is unchanged and they can still learn, which an
    all-zero pair never would (both gradients vanish).
    """
    big_r, r = a.shape[0], local_a.shape[0]
    c = math.sqrt(r / big_r)
    if big_r >= r:
        a_fit, b_fit = a[:r] * c, b[:, :r] * c
    else:
        a_fit = torch.cat([a * c, torch.zeros(r - big_r, a.shape[1])], dim=0)
        b_fit = torch.cat([b * c, torch.zeros(b.shape[0], r - big_r)], dim=1)
    dead = (b_fit.abs().sum(dim=0) == 0) & (a_fit.abs().sum(dim=1) == 0)
    a_fit[dead] = local_a[dead].to(a_fit.dtype)
    return a_fit, b_fit


def load_shared_state(model: MTSCModel, arrays: dict[str, np.ndarray]) -> None:
    """Load adapters from the server; adapts the rank when it differs (svd_lora). The
    adapters of LAM encoder layers a compressed client does not hold are skipped
    (models/mtsc/compression.py)."""
    arrays = {k: v for k, v in arrays.items() if k not in model.dropped_adapters}
    params = dict(model.named_parameters())
    names = {}
    for prefix, module in _lora_modules(model).items():
        owner = "transmitter.lam_encoder" if prefix == "encoder" else "receiver.lam_decoder"
        for key in get_peft_model_state_dict(module):
            local = key.replace(".weight", ".default.weight")
            names[f"{prefix}.{key}"] = params[f"{owner}.{local}"]
    unexpected = sorted(set(arrays) - set(names))
    if unexpected:
        raise KeyError(f"shared state has keys this model does not: {unexpected[:3]}")
    incoming = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in arrays.items()}
    with torch.no_grad():
        for key, value in incoming.items():
            if "lora_B" in key:
                continue
            b_key = key.replace("lora_A", "lora_B")
            a_local = names[key].detach().cpu()
            b_value = incoming.get(b_key, names[b_key].detach().cpu())
            a_fit, b_fit = _fit_rank(value, b_value, a_local)
            names[key].copy_(a_fit)
            incoming[b_key] = b_fit
        for key, value in incoming.items():
            if "lora_B" in key:
                if value.shape != names[key].shape:
                    raise ValueError(
                        f"{key}: got shape {tuple(value.shape)}, model has "
                        f"{tuple(names[key].shape)}"
                    )
                names[key].copy_(value)
