"""The Lightweight TOSC system (arXiv 2506.13243), student and teacher alike:

    image -> semantic encoder -> q(z|x) = N(mu, diag(sigma^2)), z ~ q
        -> channel-adaptive module (FiLM on the SNR) -> unit-power complex symbols
        -> wireless channel (models/channel.py)
        -> semantic decoder (FiLM on the SNR) -> task head (client-private)

The student's semantic encoder is a small CNN (tens of thousands of parameters); the
teacher's a ResNet-18 (about 11 M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18

from common.config import ExperimentConfig
from common.data import num_classes
from common.seeding import seeded
from models.channel import WirelessChannel

HEAD = "head."  # parameters under this prefix are client-private


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


def build(cfg: ExperimentConfig, device: torch.device | str = "cpu",
          lora_rank: int | None = None) -> TOSCModel:
    """The student (seeded: every party starts from the same weights). `lora_rank` is
    part of the seam and unused: the student has no LoRA adapters."""
    dc = cfg.distill
    feature_dim = dc.teacher.hidden if dc.feature_weight > 0 else None
    with seeded(cfg.seed + 2):
        return TOSCModel(cfg, small_cnn(dc.width), dc.latent_dim, dc.hidden, feature_dim).to(device)
