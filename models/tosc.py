"""The `tosc` workload: a lightweight task-oriented semantic communication student
distilled from a large teacher (Lightweight TOSC, arXiv 2506.13243).

    image -> semantic encoder (small CNN) -> q(z|x) = N(mu, diag(sigma^2)), z ~ q
        -> channel-adaptive module (FiLM on the SNR) -> unit-power complex symbols
        -> wireless channel (models/channel.py)
        -> semantic decoder (FiLM on the SNR) -> task head (client-private)

Loss, the paper's information-bottleneck distillation objective:

    L = task_weight * CE(y, s)                                  task
      + beta * KL(q(z|x) || N(0, I))                            information bottleneck
      + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))      distillation (Hinton et al.)
      + feature_weight * ||P h_s - h_t||^2                      optional feature matching

The teacher is the same system around a ResNet-18 semantic encoder (about 11 M
parameters against the student's tens of thousands), trained centrally on a public split
of synthetic scenes that no client owns and saved to a local checkpoint file
(`distill.teacher.checkpoint`); an edge device receives that file once, like a
pre-trained model. (The `mtsc` model at a larger size was tried first as the teacher:
its BART-style LAM did not learn the classification task within minutes of CPU
training, see the README.) Each client runs the teacher once over its training
set, stores the outputs compressed (float16 top-k logits, optional float16 features)
and reuses them every epoch and every round (the paper's pre-stored compression).

The student's weights are shared with the server (FedAvg or FedProx); the task head
stays on the client.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence
from torch.utils.data import DataLoader, Dataset
from torchvision.models import resnet18

from models.channel import WirelessChannel
from models.mtsc import seeded
from simulation.config import ExperimentConfig, resolve_path
from simulation.data import SyntheticScenes, num_classes

HEAD = "head."  # parameters under this prefix are client-private

# ----------------------------------------------------------------------------- losses


def information_bottleneck_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)), summed over latent dims, mean over the
    batch: the rate term of the variational information bottleneck (Alemi et al. 2017),
    which the paper's IB loss weights by beta."""
    q = Normal(mu, torch.exp(0.5 * logvar))
    return kl_divergence(q, Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1).mean()


def distillation_kl(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(p_teacher^T || softmax(student / T)), mean over the batch (Hinton et al.
    2015). `teacher_probs` are already softened at T; zeros (logits outside the stored
    top-k) add nothing."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(log_q, teacher_probs, reduction="batchmean")


def softened_topk(values: Tensor, indices: Tensor, n_classes: int, temperature: float) -> Tensor:
    """Teacher probabilities at temperature T from stored top-k logits: softmax over the
    kept logits, zero elsewhere (exact when k equals the number of classes)."""
    logits = torch.full((values.shape[0], n_classes), float("-inf"), device=values.device)
    logits.scatter_(1, indices.long(), values.float())
    return torch.softmax(logits / temperature, dim=-1)


# ----------------------------------------------------------------------------- student


class SNRFiLM(nn.Module):
    """Channel-adaptive module: feature-wise affine modulation by the SNR (FiLM, Perez et
    al. 2018), x * (1 + gamma(snr)) + beta(snr). Starts as the identity."""

    def __init__(self, features: int, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 2 * features))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, snr_db: Tensor) -> Tensor:
        gamma, beta = self.net((snr_db / 10.0).unsqueeze(-1)).chunk(2, dim=-1)
        return x * (1 + gamma) + beta


def small_cnn(width: int) -> tuple[nn.Module, int]:
    """The student's feature extractor: three conv-ReLU-maxpool blocks (16 * width out)."""
    w = width
    net = nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(2),
        nn.Flatten(),
    )
    return net, 16 * w


def resnet18_trunk() -> tuple[nn.Module, int]:
    """The teacher's feature extractor: torchvision's ResNet-18 (random init, no
    classifier; 512 features)."""
    net = resnet18(weights=None)
    net.fc = nn.Identity()
    return net, 512


@dataclass
class TOSCOutput:
    logits: Tensor  # [B, classes]
    features: Tensor  # [B, hidden]: the decoder's output, the head's input
    mu: Tensor  # [B, latent]
    logvar: Tensor  # [B, latent]


class TOSCModel(nn.Module):
    """A task-oriented semantic communication system: semantic encoder -> stochastic
    latent -> channel-adaptive module -> channel -> semantic decoder -> task head.
    The student is a small one; the teacher the same system around a ResNet-18."""

    def __init__(self, cfg: ExperimentConfig, trunk: tuple[nn.Module, int], latent_dim: int,
                 hidden: int, feature_dim: int | None = None):
        super().__init__()
        backbone, dim = trunk
        self.encoder = backbone
        self.to_latent = nn.Linear(dim, 2 * latent_dim)
        self.tx_adapter = SNRFiLM(latent_dim)
        self.channel = WirelessChannel(cfg.channel)
        self.decoder_in = nn.Linear(latent_dim, hidden)
        self.rx_adapter = SNRFiLM(hidden)
        self.decoder_out = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes(cfg.data))
        # Maps student features onto the teacher's for feature matching (training only).
        self.feature_proj = nn.Linear(hidden, feature_dim) if feature_dim else None

    def forward(self, image: Tensor, snr_db: Tensor | None = None,
                noiseless: bool = False) -> TOSCOutput:
        if snr_db is None:
            snr_db = self.channel.sample_snr_db(image.shape[0], image.device)
        mu, logvar = self.to_latent(self.encoder(image)).chunk(2, dim=-1)
        logvar = logvar.clamp(-10.0, 10.0)
        # Reparameterised sample while training; the mean at inference.
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        z = self.tx_adapter(z, snr_db)
        symbols = torch.view_as_complex(z.reshape(z.shape[0], -1, 2).contiguous())
        power = (symbols.abs() ** 2).mean(dim=1, keepdim=True)
        symbols = symbols / torch.sqrt(power + 1e-12)  # unit average power per example
        received = symbols if noiseless else self.channel(symbols, snr_db)
        h = F.relu(self.decoder_in(torch.view_as_real(received).flatten(1)))
        h = F.relu(self.decoder_out(self.rx_adapter(h, snr_db)))
        return TOSCOutput(self.head(h), h, mu, logvar)


# ----------------------------------------------------------------------------- teacher


def teacher_fingerprint(cfg: ExperimentConfig) -> dict:
    """What the stored teacher depends on; a checkpoint made for other values is refused."""
    t = dataclasses.asdict(cfg.distill.teacher)
    t.pop("checkpoint")
    seed = t.pop("seed")
    d = cfg.data
    channel = dataclasses.asdict(cfg.channel)
    channel.pop("sweep_snr_db")
    return {"teacher": t, "seed": seed, "channel": channel,
            "data": {"seed": d.seed, "image_size": d.image_size, "max_objects": d.max_objects,
                     "public_first_index": d.num_samples}}


def teacher_path(cfg: ExperimentConfig) -> Path:
    return resolve_path(cfg.distill.teacher.checkpoint)


def public_split(cfg: ExperimentConfig) -> SyntheticScenes:
    """The teacher's training data: scenes past the clients' range, so no client owns them."""
    first = cfg.data.num_samples
    return SyntheticScenes(cfg.data, range(first, first + cfg.distill.teacher.public_samples))


def build_teacher(cfg: ExperimentConfig) -> TOSCModel:
    t = cfg.distill.teacher
    with seeded(t.seed + 3):
        return TOSCModel(cfg, resnet18_trunk(), t.latent_dim, t.hidden)


def train_teacher(cfg: ExperimentConfig, log=print) -> tuple[TOSCModel, dict]:
    """Train the teacher centrally on the public split: AdamW on cross-entropy plus
    the same IB term (beta) as the students, channel SNRs drawn as configured."""
    t = cfg.distill.teacher
    teacher = build_teacher(cfg)
    data = public_split(cfg)
    torch.manual_seed(t.seed)
    opt = torch.optim.AdamW(teacher.parameters(), lr=t.lr)
    loader = DataLoader(data, batch_size=t.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(t.seed))
    start = time.perf_counter()
    teacher.train()
    for epoch in range(t.epochs):
        total, correct = 0.0, 0
        for batch in loader:
            out = teacher(batch["image"])
            loss = (F.cross_entropy(out.logits, batch["label"])
                    + cfg.distill.beta * information_bottleneck_kl(out.mu, out.logvar))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(out.logits)
            correct += (out.logits.argmax(-1) == batch["label"]).sum().item()
        log(f"teacher epoch {epoch + 1}/{t.epochs}: loss {total / len(data):.3f}, "
            f"train accuracy {correct / len(data):.3f}")
    info = {"train_seconds": time.perf_counter() - start, "public_samples": len(data),
            "public_train_accuracy": correct / len(data)}
    return teacher.eval(), info


def ensure_teacher(cfg: ExperimentConfig, log=print) -> Path:
    """The teacher checkpoint: trained and written when missing, else checked."""
    path = teacher_path(cfg)
    if path.is_file():
        load_teacher(cfg)  # refuses a checkpoint made for another config
        return path
    log(f"no teacher at {path}: training it on {cfg.distill.teacher.public_samples} "
        "public scenes")
    teacher, info = train_teacher(cfg, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"fingerprint": json.dumps(teacher_fingerprint(cfg), sort_keys=True),
                "info": info, "state_dict": teacher.state_dict()}, tmp)
    os.replace(tmp, path)  # a crash never leaves half a checkpoint
    log(f"teacher saved to {path} ({info['train_seconds']:.0f} s)")
    return path


def prepare(cfg: ExperimentConfig) -> None:
    """Run by the server before round 1: the clients need the teacher file."""
    ensure_teacher(cfg)


def load_teacher(cfg: ExperimentConfig) -> TOSCModel:
    path = teacher_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(
            f"distill.teacher.checkpoint={cfg.distill.teacher.checkpoint!r}: no teacher file at "
            f"{path}. The server trains it before round 1 (python -m simulation) and "
            "python -m simulation.distill_report trains it too; on a separate device, copy "
            "the server's teacher file to this path.")
    saved = _read_checkpoint(str(path), path.stat().st_mtime_ns)
    want = json.dumps(teacher_fingerprint(cfg), sort_keys=True)
    if saved["fingerprint"] != want:
        have, want_d = json.loads(saved["fingerprint"]), json.loads(want)
        diff = sorted(k for k in want_d if have.get(k) != want_d.get(k))
        raise ValueError(
            f"teacher checkpoint {path} was trained for other settings ({', '.join(diff)} "
            "differ). Delete it to retrain, or set distill.teacher.checkpoint to a new file.")
    teacher = build_teacher(cfg)
    teacher.load_state_dict(saved["state_dict"])
    return teacher.eval()


@functools.lru_cache(maxsize=2)
def _read_checkpoint(path: str, mtime_ns: int) -> dict:
    # Cached: the clients of one simulation process read the same file.
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def teacher_logits_features(teacher: TOSCModel, image: Tensor, cfg: ExperimentConfig
                            ) -> tuple[Tensor, Tensor]:
    """The teacher's logits and features on a noiseless link at the top of the
    configured SNRs: its soft labels are then deterministic and can be stored."""
    teacher.eval()
    lo_hi = cfg.channel.snr_range_db
    top = float(lo_hi[1]) if lo_hi is not None else float(cfg.channel.snr_db)
    out = teacher(image, torch.full((image.shape[0],), top), noiseless=True)
    return out.logits, out.features


# ----------------------------------------------------------------------------- pre-stored outputs


@dataclass
class TeacherOutputs:
    """Compressed teacher outputs of a dataset, row i for example i."""

    topk_values: np.ndarray  # float16 [N, k]: the k largest logits
    topk_indices: np.ndarray  # uint8 [N, k]: their classes
    features: np.ndarray  # float16 [N, D], or [N, 0] without feature matching

    @property
    def nbytes(self) -> int:
        return self.topk_values.nbytes + self.topk_indices.nbytes + self.features.nbytes


@torch.no_grad()
def compute_teacher_outputs(teacher: TOSCModel, data: Dataset, cfg: ExperimentConfig
                            ) -> TeacherOutputs:
    values, indices, features = [], [], []
    for batch in DataLoader(data, batch_size=256):
        logits, h = teacher_logits_features(teacher, batch["image"], cfg)
        top = logits.topk(cfg.distill.top_k, dim=-1)
        values.append(top.values.half())
        indices.append(top.indices.to(torch.uint8))
        features.append(h.half() if cfg.distill.feature_weight > 0 else h[:, :0].half())
    return TeacherOutputs(*(torch.cat(x).numpy() for x in (values, indices, features)))


def _store_file(cfg: ExperimentConfig, data: Dataset) -> Path:
    """Keyed by the teacher, the compression settings and the images themselves."""
    key = hashlib.sha1(json.dumps([teacher_fingerprint(cfg), cfg.distill.top_k,
                                   cfg.distill.feature_weight > 0]).encode())
    for batch in DataLoader(data, batch_size=1024):
        key.update(batch["image"].numpy().tobytes())
    folder = (resolve_path(cfg.distill.store_dir) if cfg.distill.store_dir
              else teacher_path(cfg).with_suffix(".outputs"))
    return folder / f"{key.hexdigest()}.npz"


def prestored_teacher_outputs(cfg: ExperimentConfig, data: Dataset
                              ) -> tuple[TeacherOutputs, float]:
    """The stored teacher outputs of `data`, computed (and stored) on first use.

    Returns them and the seconds spent running the teacher now (0 when reused)."""
    path = _store_file(cfg, data)
    if path.is_file():
        with np.load(path) as f:
            return TeacherOutputs(f["topk_values"], f["topk_indices"], f["features"]), 0.0
    start = time.perf_counter()
    outputs = compute_teacher_outputs(load_teacher(cfg), data, cfg)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **dataclasses.asdict(outputs))
    os.replace(tmp, path)
    return outputs, seconds


class _Indexed(Dataset):
    """Adds each example's position, to look up its stored teacher outputs."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {**self.data[i], "index": torch.tensor(i)}


# ----------------------------------------------------------------------------- the seam


def build(cfg: ExperimentConfig, device: torch.device | str = "cpu",
          lora_rank: int | None = None) -> TOSCModel:
    """The student (seeded: every party starts from the same weights). `lora_rank` is
    part of the seam and unused: the student has no LoRA adapters."""
    dc = cfg.distill
    feature_dim = dc.teacher.hidden if dc.feature_weight > 0 else None
    with seeded(cfg.seed + 2):
        return TOSCModel(cfg, small_cnn(dc.width), dc.latent_dim, dc.hidden, feature_dim).to(device)


def shared_state(model: TOSCModel, lora_train: str = "ab") -> dict[str, np.ndarray]:
    """The only tensors that may leave a client: every student weight but the task head."""
    return {name: p.detach().cpu().float().numpy() for name, p in model.named_parameters()
            if not name.startswith(HEAD)}


def load_shared_state(model: TOSCModel, arrays: dict[str, np.ndarray]) -> None:
    params = {n: p for n, p in model.named_parameters() if not n.startswith(HEAD)}
    unexpected = sorted(set(arrays) - set(params))
    if unexpected:
        raise KeyError(f"shared state has keys this student does not: {unexpected[:3]}")
    with torch.no_grad():
        for key, value in arrays.items():
            value = torch.as_tensor(np.asarray(value), dtype=torch.float32)
            if value.shape != params[key].shape:
                raise ValueError(f"{key}: got shape {tuple(value.shape)}, student has "
                                 f"{tuple(params[key].shape)}")
            params[key].copy_(value)


def distill_losses(out: TOSCOutput, label: Tensor, cfg: ExperimentConfig,
                   teacher_probs: Tensor | None = None,
                   teacher_features: Tensor | None = None,
                   feature_proj: nn.Module | None = None) -> dict[str, Tensor]:
    """The terms of the IB distillation loss (module docstring), unweighted."""
    losses = {"task": F.cross_entropy(out.logits, label),
              "ib": information_bottleneck_kl(out.mu, out.logvar)}
    if teacher_probs is not None:
        losses["kd"] = distillation_kl(out.logits, teacher_probs, cfg.distill.temperature)
    if teacher_features is not None and feature_proj is not None:
        losses["feature"] = F.mse_loss(feature_proj(out.features), teacher_features.float())
    return losses


def train_local(model: TOSCModel, data: Dataset, cfg: ExperimentConfig,
                lora_train: str = "ab", seed: int = 0) -> dict[str, float]:
    """Local epochs of AdamW on the IB distillation loss, with the pre-stored teacher
    outputs; FedProx adds (mu/2)||w - w_global||^2 over the shared weights (Li et al.
    2020), w_global being the weights just loaded from the server."""
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
    n_classes = num_classes(cfg.data)
    model.train()
    sums: dict[str, float] = {}
    n_seen = 0
    for _ in range(cfg.train.local_epochs):
        for batch in loader:
            image, label = batch["image"].to(device), batch["label"].to(device)
            probs = feats = None
            if stored is not None:
                idx = batch["index"].numpy()
                probs = softened_topk(torch.from_numpy(stored.topk_values[idx]),
                                      torch.from_numpy(stored.topk_indices[idx]),
                                      n_classes, dc.temperature).to(device)
                if stored.features.shape[1] > 0:
                    feats = torch.from_numpy(stored.features[idx]).to(device)
            out = model(image)
            losses = distill_losses(out, label, cfg, probs, feats, model.feature_proj)
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
