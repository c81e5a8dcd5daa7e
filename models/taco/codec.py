"""The shared codec: a VQ autoencoder with 4x spatial downsampling (diffusers VQModel).

TACO (Sec. III-A) codes an image x as z = Q(E(x)), one codebook index per 4x4 pixel
block, and its context as z_c = Q(E(S_4(x))), the same codec applied to x downsampled
4x. The codec is pre-trained centrally on the source's public split, examples that no
client owns (those after the clients', as tosc's teacher: common/data), on both scales,
and written to `taco.codec.checkpoint` by the server; the federation fine-tunes it.

Quantisation and the VQ loss are written here rather than taken from diffusers'
`VectorQuantizer`: with `legacy=True` (VQModel's default) it puts the commitment weight
beta on the codebook term instead of the encoder term. Ours is van den Oord et al.
(2017), Eq. 3: ||sg[E(x)] - e||^2 + beta ||E(x) - sg[e]||^2, with the codebook of
VQModel (`quantize.embedding`) as e.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from common.config import ExperimentConfig, resolve_path
from common.data.tensor_dataset import TensorDictDataset
from common.seeding import seeded
from models import pretrained

DOWNSAMPLE = 4  # the codec's spatial factor f, and the context's S_4 / U_4
KIND = "taco-codec"
CHECKPOINT_KEY = "taco.codec.checkpoint"


def bits_per_index(codebook_size: int) -> int:
    """ceil(log2 K): the bits of one codebook index."""
    return max(1, math.ceil(math.log2(codebook_size)))


def downsample(x: Tensor) -> Tensor:
    """S_4: the image at a quarter of its side (mean of each 4x4 block)."""
    return F.avg_pool2d(x, DOWNSAMPLE)


def upsample(x: Tensor) -> Tensor:
    """U_4: back to full size (bilinear)."""
    return F.interpolate(x, scale_factor=DOWNSAMPLE, mode="bilinear", align_corners=False)


class VQCodec(nn.Module):
    """E, Q and D of TACO around diffusers' VQModel; images in [0, 1]."""

    def __init__(self, cfg: ExperimentConfig):
        super().__init__()
        from diffusers import VQModel

        c = cfg.taco.codec
        self.beta = c.beta
        # Three blocks: two downsamplings, 4x. The mid-block attention is left out: at
        # the context's 2x2 latents it has nothing to attend to, and it doubles the cost.
        self.vq = VQModel(in_channels=3, out_channels=3,
                          down_block_types=("DownEncoderBlock2D",) * 3,
                          up_block_types=("UpDecoderBlock2D",) * 3,
                          block_out_channels=tuple(c.block_out_channels), layers_per_block=1,
                          latent_channels=c.embed_dim, num_vq_embeddings=c.codebook_size,
                          norm_num_groups=8, sample_size=cfg.data.image_size,
                          mid_block_add_attention=False)

    @property
    def codebook(self) -> Tensor:
        return self.vq.quantize.embedding.weight  # [K, D]

    def encode(self, x: Tensor) -> Tensor:
        """E(x): continuous latents [B, D, H/4, W/4]."""
        return self.vq.encode(x * 2 - 1).latents

    def nearest(self, h: Tensor) -> Tensor:
        """Q: the index of the nearest codebook entry at every position, [B, H, W]."""
        b, d, hh, ww = h.shape
        flat = h.permute(0, 2, 3, 1).reshape(-1, d)
        e = self.codebook
        dist = (flat ** 2).sum(1, keepdim=True) - 2 * flat @ e.t() + (e ** 2).sum(1)
        return dist.argmin(1).reshape(b, hh, ww)

    @torch.no_grad()
    def indices(self, x: Tensor) -> Tensor:
        """z = Q(E(x)) as codebook indices [B, H/4, W/4]."""
        return self.nearest(self.encode(x))

    def embed(self, idx: Tensor) -> Tensor:
        return self.vq.quantize.embedding(idx).permute(0, 3, 1, 2)

    def decode(self, idx: Tensor) -> Tensor:
        """D(z): the image [B, 3, 4H, 4W] in [0, 1] of codebook indices [B, H, W]."""
        out = self.vq.decode(self.embed(idx), force_not_quantize=True).sample
        return ((out + 1) / 2).clamp(0, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Training pass: the reconstruction (straight-through estimator) and the VQ loss."""
        h = self.encode(x)
        e = self.embed(self.nearest(h.detach()))
        vq_loss = F.mse_loss(e, h.detach()) + self.beta * F.mse_loss(h, e.detach())
        z = h + (e - h).detach()  # straight-through: D's gradient reaches E
        out = self.vq.decode(z, force_not_quantize=True).sample
        return ((out + 1) / 2).clamp(0, 1), vq_loss


def codec_loss(codec: VQCodec, x: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Reconstruction of x and of S_4(x) (the context is coded by the same codec) plus
    their VQ losses."""
    rec, vq = codec(x)
    small = downsample(x)
    rec_s, vq_s = codec(small)
    mse, mse_s = F.mse_loss(rec, x), F.mse_loss(rec_s, small)
    loss = mse + mse_s + vq + vq_s
    return loss, {"codec_mse": mse.item(), "codec_context_mse": mse_s.item(),
                  "codec_vq_loss": (vq + vq_s).item()}


def build_codec(cfg: ExperimentConfig) -> VQCodec:
    with seeded(cfg.taco.codec.seed + 7):
        return VQCodec(cfg)


# ----------------------------------------------------------------------------- pre-training


def codec_fingerprint(cfg: ExperimentConfig) -> dict:
    """What the stored codec depends on; a file made for other values is refused."""
    c = dataclasses.asdict(cfg.taco.codec)
    for key in ("checkpoint", "local_epochs", "local_lr"):  # federated, not pre-training
        c.pop(key)
    return {"codec": c, "data": pretrained.public_data_fingerprint(cfg.data)}


def codec_path(cfg: ExperimentConfig) -> Path:
    return resolve_path(cfg.taco.codec.checkpoint)


def public_split(cfg: ExperimentConfig) -> TensorDictDataset:
    """The source's public split (the examples after the clients'): no client owns
    them; too small a source is refused with the fix."""
    return pretrained.public_split(cfg.data, cfg.taco.codec.public_samples,
                                   "taco.codec.public_samples")


@torch.no_grad()
def init_codebook_from_data(codec: VQCodec, images: Tensor, seed: int) -> None:
    """Codebook entries drawn from encoder outputs of real images (both scales), so
    that entries start where the latents are (fewer dead entries than a uniform init)."""
    h = torch.cat([codec.encode(images).permute(0, 2, 3, 1).reshape(-1, codec.codebook.shape[1]),
                   codec.encode(downsample(images)).permute(0, 2, 3, 1)
                   .reshape(-1, codec.codebook.shape[1])])
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(h), (codec.codebook.shape[0],), generator=g)
    noise = 0.01 * torch.randn(codec.codebook.shape, generator=g)
    codec.codebook.copy_(h[pick] + noise)


def train_codec(cfg: ExperimentConfig, log=print) -> tuple[VQCodec, dict]:
    """Central pre-training on the public split (AdamW on `codec_loss`)."""
    from rich.progress import Progress

    c = cfg.taco.codec
    codec = build_codec(cfg)
    data = public_split(cfg)
    torch.manual_seed(c.seed)
    init_codebook_from_data(codec, data.tensors["image"][:256], c.seed)
    opt = torch.optim.AdamW(codec.parameters(), lr=c.lr)
    loader = DataLoader(data, batch_size=c.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(c.seed))
    start = time.perf_counter()
    codec.train()
    with Progress(transient=True) as progress:
        task = progress.add_task("pre-training the taco codec", total=c.epochs * len(loader))
        for epoch in range(c.epochs):
            sums, n = {}, 0
            for batch in loader:
                loss, parts = codec_loss(codec, batch["image"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v * len(batch["image"])
                n += len(batch["image"])
                progress.advance(task)
            log(f"codec epoch {epoch + 1}/{c.epochs}: " + ", ".join(
                f"{k} {v / n:.4f}" for k, v in sums.items()))
    info = {"train_seconds": time.perf_counter() - start, "public_samples": len(data),
            **{k: v / n for k, v in sums.items()}}
    return codec.eval(), info


def ensure_codec(cfg: ExperimentConfig, log=print) -> Path:
    """The pre-trained codec file: trained and written when missing, else checked."""
    def train() -> dict:
        codec, info = train_codec(cfg, log)
        return {"info": info, "state_dict": codec.state_dict()}

    path = codec_path(cfg)
    pretrained.ensure(path, KIND, codec_fingerprint(cfg), CHECKPOINT_KEY, train, log)
    return path


def load_codec(cfg: ExperimentConfig) -> VQCodec:
    saved = pretrained.load(
        codec_path(cfg), KIND, codec_fingerprint(cfg), CHECKPOINT_KEY,
        "The server pre-trains it before round 1 (python -m simulation), and "
        "python -m reports.taco does too.")
    codec = build_codec(cfg)
    codec.load_state_dict(saved["state_dict"])
    return codec.eval()


def codec_state(codec: VQCodec) -> dict[str, np.ndarray]:
    return {n: p.detach().cpu().float().numpy() for n, p in codec.named_parameters()}
