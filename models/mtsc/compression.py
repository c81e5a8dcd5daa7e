"""A transmitter sized to each client's budget (LAM-MTSC, Sec. II: adaptive model
compression for clients with little memory or compute).

A client declares a budget: a share of the full transmitter's compute (a number in
(0, 1], e.g. 0.5) or the memory its transmitter may take (a size with a unit, e.g.
"300kB", "1.5MiB"). The budget picks one rung of a fixed ladder of compression plans
(`LADDER`, docs/compression.md): the first rung, from the full model down, whose
transmitter fits. A rung with keep share s keeps

- the first round(s * L) of the shared LAM encoder's L layers (the others, and their
  LoRA adapters, are not built into the transmitter and never sent),
- LoRA rank round(s * r) of the client's rank r (svd_lora aggregates mixed ranks),
- round(s * C) of the JSCC's C channel symbols per token (a lower rate on the air),
- s of the image encoder's hidden channels (the CNN is private to each client, so its
  width needs no agreement; it is most of the transmitter's compute at these sizes),
- and, below s = 1, int8 dynamic quantisation of the transmitter's Linear layers.

Depth-wise sub-models of one shared model follow InclusiveFL (Liu et al., "No One Left
Behind: Inclusive Federated Learning over Heterogeneous Devices", KDD 2022) and DepthFL
(Kim et al., ICLR 2023): a shallow client keeps the first layers, and the server
averages each layer's tensors over the clients that hold it (strategies/svd_lora.py).

int8 is what dynamic quantisation does: weights stored in int8, activations quantised on
the fly, for inference. Training stays fp32 (LoRA's gradients need float weights); the
int8 transmitter (`deployed_transmitter`: LoRA merged into the base weights, then
torch's `quantize_dynamic` on every Linear) is what the client evaluates with and what
the memory and latency of a plan are measured on. torch's eager-mode quantisation runs
on the CPU only, so a client on a GPU evaluates its transmitter in fp32 (and warns).

Costs are measured, not estimated: the memory of a rung is the bytes of its (deployed)
transmitter's weights, its compute the FLOPs of its fp32 forward on one example,
counted by torch's `FlopCounterMode`; both from the model built for the config.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from common.config import ExperimentConfig
from models.mtsc.config import Budget, parse_budget

log = logging.getLogger("fedsemcom")

# Keep shares of the rungs, full model first.
LADDER = (1.0, 0.75, 0.5, 0.25)


@dataclass(frozen=True)
class Plan:
    """How a client's transmitter is compressed."""

    share: float  # the rung's keep share s (also the image encoder's width)
    layers: int  # LAM encoder layers kept (the first ones of the shared model)
    lora_rank: int
    jscc_symbols: int  # channel symbols per token at full rate
    int8: bool  # int8 dynamic quantisation of the deployed transmitter's Linear layers


def rung(cfg: ExperimentConfig, lora_rank: int, share: float) -> Plan:
    """The plan of keep share `share` for a client of rank `lora_rank`."""
    m = cfg.model
    return Plan(share=share, layers=max(1, round(share * m.layers)),
                lora_rank=max(1, round(share * lora_rank)),
                jscc_symbols=max(1, round(share * m.jscc_symbols)), int8=share < 1)


def choose_plan(budget: Budget, costs: list[tuple[Plan, int, float]]) -> Plan:
    """The first rung (full model first) whose cost fits `budget`. `costs`: (plan, weight
    bytes, FLOPs per example) of every rung, the full model first."""
    full_flops = costs[0][2]
    for plan, nbytes, flops in costs:
        fits = (flops <= budget.amount * full_flops * (1 + 1e-9) if budget.kind == "compute"
                else nbytes <= budget.amount)
        if fits:
            return plan
    plan, nbytes, flops = costs[-1]
    need = (f"{flops / full_flops:.3f} of the full compute" if budget.kind == "compute"
            else f"{nbytes} bytes")
    raise ValueError(f"transmitter budget {budget.kind}={budget.amount:g}: even the smallest "
                     f"plan ({plan.layers} LAM encoder layers, LoRA rank {plan.lora_rank}, "
                     f"{plan.jscc_symbols} symbols a token, int8) takes {need}; raise the "
                     "budget or make the model smaller")


# ----------------------------------------------------------------------------- the model


def dropped_adapter_keys(n_layers: int, kept: int, keys: list[str]) -> list[str]:
    """The encoder adapter keys (`encoder.layers.<i>...` of shared_state) of layers >= kept."""
    pattern = re.compile(r"^encoder\.layers\.(\d+)\.")
    return [k for k in keys if (hit := pattern.match(k)) and kept <= int(hit.group(1)) < n_layers]


def keep_encoder_layers(lam_encoder: nn.Module, kept: int) -> None:
    """Keep the first `kept` layers of a BART encoder (with their adapters)."""
    lam_encoder.layers = nn.ModuleList(list(lam_encoder.layers)[:kept])


def merge_lora(module: nn.Module) -> nn.Module:
    """`module` with every peft LoRA layer merged into its base Linear and unwrapped
    (W + (alpha/r) B A in one weight): what a deployed transmitter runs."""
    from peft.tuners.lora import LoraLayer

    for name, child in list(module.named_children()):
        if isinstance(child, LoraLayer):
            child.merge()
            setattr(module, name, child.get_base_layer())
        else:
            merge_lora(child)
    return module


def deployed_transmitter(transmitter: nn.Module, int8: bool) -> nn.Module:
    """A copy of the transmitter as a client deploys it, in eval mode on the CPU: LoRA
    merged, and with `int8` every Linear quantised by torch's dynamic quantisation
    (int8 weights, activations quantised per batch)."""
    deployed = merge_lora(copy.deepcopy(transmitter).cpu().eval())
    if not int8:
        return deployed
    with warnings.catch_warnings():  # torch marks eager-mode quantisation for migration
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(deployed, {nn.Linear}, dtype=torch.qint8)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's weights: parameters and buffers, a dynamically quantised
    Linear as its int8 weight, its fp32 bias and its scale and zero point."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    total = 0
    for sub in module.modules():
        if isinstance(sub, QLinear):
            weight, bias = sub._packed_params._weight_bias()
            total += weight.int_repr().nbytes + 8 + (0 if bias is None else bias.nbytes)
            continue
        total += sum(t.nbytes for t in sub.parameters(recurse=False))
        total += sum(t.nbytes for t in sub.buffers(recurse=False))
    return total


def example_inputs(cfg: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One example's (image, question, SNR) for measuring a transmitter."""
    from common.data import text_vocab

    s = cfg.data.image_size
    question = None
    if "vqa" in cfg.model.tasks:
        question = torch.full((1, text_vocab(cfg.data).question_len), 4, dtype=torch.long)
    return torch.zeros(1, 3, s, s), question, torch.full((1,), 10.0)


def forward_flops(transmitter: nn.Module, cfg: ExperimentConfig) -> float:
    """FLOPs of one example's forward through the (fp32) transmitter, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        transmitter.eval()(*example_inputs(cfg))
    return float(counter.get_total_flops())


@functools.lru_cache(maxsize=16)
def _ladder_costs(experiment_json: str, lora_rank: int, build) -> list[tuple[Plan, int, float]]:
    from common.config import config_from_dict

    cfg = config_from_dict(json.loads(experiment_json))
    out = []
    for share in LADDER:
        plan = rung(cfg, lora_rank, share)
        tx = build(cfg, "cpu", lora_rank, plan).transmitter
        nbytes = weight_bytes(deployed_transmitter(tx, plan.int8))
        out.append((plan, nbytes, forward_flops(tx, cfg)))
    return out


def ladder_costs(cfg: ExperimentConfig, lora_rank: int, build) -> list[tuple[Plan, int, float]]:
    """(plan, deployed transmitter weight bytes, fp32 FLOPs per example) of every rung,
    measured on the models `build(cfg, device, lora_rank, plan)` makes for `cfg` (the
    budget itself left out): models/mtsc/model.build_compressed."""
    neutral = copy.deepcopy(cfg)
    neutral.sections["model"] = dataclasses.replace(cfg.model, transmitter_budget=None,
                                                    client_budgets=[])
    return _ladder_costs(neutral.to_json(), int(lora_rank), build)


def client_plan(cfg: ExperimentConfig, lora_rank: int, build) -> Plan | None:
    """The plan of this client's `model.transmitter_budget`, its rungs measured on the
    models `build` makes (see `ladder_costs`); None without one (the full model, built
    exactly as without compression)."""
    value = cfg.model.transmitter_budget
    if value is None:
        return None
    return choose_plan(parse_budget(value), ladder_costs(cfg, lora_rank, build))
