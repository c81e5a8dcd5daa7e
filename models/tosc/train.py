"""Local training (IB distillation with the pre-stored teacher outputs) and
evaluation of the tosc students."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from common.config import ExperimentConfig
from common.data import num_classes
from common.seeding import seeded
from models.channel import WirelessChannel
from models.tosc.losses import distill_losses, softened_topk
from models.tosc.model import HEAD, TOSCModel
from models.tosc.teacher import prestored_teacher_outputs


class _Indexed(Dataset):
    """Adds each example's position, to look up its stored teacher outputs."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {**self.data[i], "index": torch.tensor(i)}


def train_local(model: TOSCModel, data: Dataset, cfg: ExperimentConfig,
                lora_train: str = "ab", seed: int = 0, make_private=None) -> dict[str, float]:
    """Local epochs of AdamW on the IB distillation loss, with the pre-stored teacher
    outputs; FedProx adds (mu/2)||w - w_global||^2 over the shared weights (Li et al.
    2020), w_global being the weights just loaded from the server.
    `make_private(model, optimizer, loader)` (DP-SGD, privacy/dp.py) wraps the three
    before the first step."""
    torch.manual_seed(seed)
    dc = cfg.distill
    device = next(model.parameters()).device
    use_teacher = dc.kd_weight > 0 or dc.feature_weight > 0
    stored, teacher_seconds = prestored_teacher_outputs(cfg, data) if use_teacher else (None, 0.0)
    weights = {"task": dc.task_weight, "ib": dc.beta, "kd": dc.kd_weight,
               "feature": dc.feature_weight}
    mu_prox = cfg.strategy.proximal_mu if cfg.strategy.name == "fedprox" else 0.0
    global_weights = {n: p.detach().clone() for n, p in model.named_parameters()
                      if not n.startswith(HEAD)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loader = DataLoader(_Indexed(data), batch_size=cfg.train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    net = model
    if make_private is not None:
        net, opt, loader = make_private(model, opt, loader)
    n_classes = num_classes(cfg.data)
    model.train()
    sums: dict[str, float] = {}
    n_seen = 0
    for _ in range(cfg.train.local_epochs):
        for batch in loader:
            if len(batch["label"]) == 0:  # Poisson sampling (DP-SGD) may draw no example
                continue
            image, label = batch["image"].to(device), batch["label"].to(device)
            probs = feats = None
            if stored is not None:
                idx = batch["index"].numpy()
                probs = softened_topk(torch.from_numpy(stored.topk_values[idx]),
                                      torch.from_numpy(stored.topk_indices[idx]),
                                      n_classes, dc.temperature).to(device)
                if stored.features.shape[1] > 0:
                    feats = torch.from_numpy(stored.features[idx]).to(device)
            out = net(image)
            losses = distill_losses(out, label, cfg.distill, probs, feats, model.feature_proj)
            loss = sum(weights[k] * v for k, v in losses.items())
            if mu_prox > 0:
                params = dict(model.named_parameters())
                losses["prox"] = sum(((params[n] - w) ** 2).sum()
                                     for n, w in global_weights.items())
                loss = loss + mu_prox / 2 * losses["prox"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n = len(label)
            n_seen += n
            sums["train_loss"] = sums.get("train_loss", 0.0) + loss.item() * n
            for k in ("task", "ib", "kd", "feature"):
                if k in losses:
                    sums[f"loss_{k}"] = sums.get(f"loss_{k}", 0.0) + losses[k].item() * n
    metrics = {k: v / n_seen for k, v in sums.items()}
    metrics.update({
        # Every reply carries the same keys (Flower averages them key by key).
        "loss_kd": metrics.get("loss_kd", 0.0), "loss_feature": metrics.get("loss_feature", 0.0),
        "symbols_per_example": dc.latent_dim / 2,
        "teacher_seconds": teacher_seconds,
        "teacher_store_bytes": stored.nbytes if stored is not None else 0,
        "num-examples": len(data),
    })
    return metrics


@torch.no_grad()
def evaluate(model: TOSCModel, data: Dataset, cfg: ExperimentConfig) -> dict[str, float]:
    """Accuracy and cross-entropy on the client's local test split, with its own head,
    at the configured channel (the same SNR draws and noise at every evaluation), and
    majority_class_share: the accuracy of a constant guess of the most common label."""
    # The channel is the environment, not a weight: evaluate under cfg's, which may
    # differ from the one the model was built with (a fixed SNR of an SNR sweep).
    model.channel = WirelessChannel(cfg.channel)
    with seeded(cfg.seed):
        model.eval()
        device = next(model.parameters()).device
        n, loss, correct, labels = 0, 0.0, 0, []
        for batch in DataLoader(data, batch_size=256):
            image, label = batch["image"].to(device), batch["label"].to(device)
            logits = model(image).logits
            loss += F.cross_entropy(logits, label, reduction="sum").item()
            correct += (logits.argmax(-1) == label).sum().item()
            n += len(label)
            labels.append(label.cpu())
        counts = torch.bincount(torch.cat(labels))
        return {"accuracy": correct / n, "loss": loss / n, "num-examples": n,
                "majority_class_share": counts.max().item() / n}


@torch.no_grad()
def class_logits(model: TOSCModel, data: Dataset, cfg: ExperimentConfig) -> Tensor:
    """The head's logits [N, classes] of every example, in order, at the evaluation's
    seeded channel (membership inference reads them, reports/membership.py)."""
    model.channel = WirelessChannel(cfg.channel)
    with seeded(cfg.seed):
        model.eval()
        device = next(model.parameters()).device
        return torch.cat([model(batch["image"].to(device)).logits.float().cpu()
                          for batch in DataLoader(data, batch_size=256)])
