"""The `taco` workload's config section (`taco:`, with `codec:` and `link:`) and checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.config import CHANNEL_MODELS, WEIGHT_STRATEGIES, ExperimentConfig, need

# The LSF candidate rates of the paper (Sec. III-A-4), in percent of latent positions.
PAPER_RATES = [0, 10, 20, 30, 50, 70, 90, 100]
# len(models.digital_phy.MCS_TABLE), written out so that a config check loads no torch
# (tests/test_taco.py holds the two equal).
MCS_ROWS = 8
LINK_CHANNELS = tuple(m for m in CHANNEL_MODELS if m != "none")
# What taco needs of its source, {annotation: task} (common.data.require). Segmentation
# masks are optional: without them the task switch is off (models/taco/task.py).
NEEDS = {"label": "classification"}


@dataclass
class CodecConfig:
    """The shared VQ autoencoder (diffusers VQModel, 4x spatial downsampling). It is
    pre-trained centrally on the source's public split, the examples after the clients'
    that no client owns (common/data), and written to `checkpoint`; the federation then
    fine-tunes it (FedAvg)."""

    checkpoint: str = "runs/taco/codec.pt"  # server-side file; made when missing
    seed: int = 0
    codebook_size: int = 512  # K: ceil(log2 K) bits per index (the paper: 8192)
    embed_dim: int = 16  # channels of a codebook entry
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 32])  # 3 blocks: 4x
    beta: float = 0.25  # commitment weight of the VQ loss (van den Oord et al. 2017)
    public_samples: int = 1000
    epochs: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    local_epochs: int = 1  # codec epochs per federated round on a client's images
    local_lr: float = 2e-4


@dataclass
class LinkConfig:
    """The index bits over a noisy digital link (what the paper leaves open): 5G LDPC,
    CRC and QAM (models/digital_phy.py), context and task indices in two blocks."""

    # "auto": the link adaptation picks the MCS per SNR; an int: that row of
    # models.digital_phy.MCS_TABLE at every SNR.
    mcs: Literal["auto"] | int = "auto"
    channels: list[str] = field(default_factory=lambda: ["awgn", "rayleigh"])
    sweep_snr_db: list[float] = field(default_factory=lambda: [-5.0, 0.0, 5.0, 10.0, 15.0, 20.0])
    images: int = 30  # per client: the first LSF payloads of its evaluation images


@dataclass
class TacoConfig:
    codec: CodecConfig = field(default_factory=CodecConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    task_width: int = 16  # channels of the client's classifier's first conv layer
    seg_width: int = 16  # channels of the client's segmenter
    rates: list[int] = field(default_factory=lambda: list(PAPER_RATES))
    # LSF (Sec. III-A-4): the smallest rate whose receiver-side result is compatible with
    # the result on the original. "top1": the same predicted class (default: accuracy
    # is the task's metric, and a prediction equal to the original's loses none of it);
    # "confidence": the same class and its probability at least the original's minus
    # `lsf_tolerance`.
    lsf_rule: Literal["top1", "confidence"] = "top1"
    lsf_tolerance: float = 0.1
    # When no rate is compatible: "smallest" sends p = 0 (more indices would not buy
    # the original's result, so they are not spent), "largest" sends p = 100.
    lsf_fallback: Literal["smallest", "largest"] = "smallest"
    fixed_rate: int = 30  # the "fixed p without LSF" baseline (the paper's 30 %)
    # Task switching: the receiver requests the latent positions of the object it now
    # segments (predicted class pixels or pixels less confident than this), one cell wider.
    # It needs segmentation masks; a source without them runs with the switch off.
    switch_confidence: float = 0.9
    eval_images: int | None = None  # evaluate on at most this many test images per client


SECTIONS = {"taco": TacoConfig}
SPLIT = False
STRATEGIES = WEIGHT_STRATEGIES  # it shares the codec's weights


def check(cfg: ExperimentConfig) -> None:
    t, c, link = cfg.taco, cfg.taco.codec, cfg.taco.link
    need(cfg.strategy.name in STRATEGIES, "strategy.name", cfg.strategy.name,
         f"{' or '.join(repr(n) for n in STRATEGIES)} for workload 'taco' (it shares the "
         "codec's weights)")
    need(cfg.data.image_size % 16 == 0, "data.image_size", cfg.data.image_size,
         "a multiple of 16 for workload 'taco' (4x latents of a 4x-downsampled context)")
    need(cfg.privacy.dp.mode == "off", "privacy.dp.mode", cfg.privacy.dp.mode,
         "'off' for workload 'taco' (DP is not wired into its codec training)")
    need(c.codebook_size >= 2, "taco.codec.codebook_size", c.codebook_size, ">= 2")
    need(c.embed_dim >= 1, "taco.codec.embed_dim", c.embed_dim, ">= 1")
    need(len(c.block_out_channels) == 3 and all(ch >= 8 and ch % 8 == 0
                                                for ch in c.block_out_channels),
         "taco.codec.block_out_channels", c.block_out_channels,
         "three multiples of 8 (three blocks make the 4x downsampling; GroupNorm of 8 groups)")
    need(c.beta >= 0, "taco.codec.beta", c.beta, ">= 0")
    need(c.public_samples >= 10, "taco.codec.public_samples", c.public_samples, ">= 10")
    for key in ("epochs", "batch_size"):
        need(getattr(c, key) >= 1, f"taco.codec.{key}", getattr(c, key), ">= 1")
    need(c.local_epochs >= 0, "taco.codec.local_epochs", c.local_epochs,
         ">= 0 (0: the clients do not fine-tune the codec)")
    need(c.lr > 0 and c.local_lr > 0, "taco.codec.lr", c.lr, "> 0 (and local_lr > 0)")
    need(bool(c.checkpoint), "taco.codec.checkpoint", c.checkpoint, "a local file path")
    need(bool(t.rates) and t.rates == sorted(set(t.rates)) and t.rates[0] == 0
         and t.rates[-1] == 100 and all(0 <= r <= 100 for r in t.rates), "taco.rates",
         t.rates, "increasing percentages from 0 to 100, e.g. " + str(PAPER_RATES))
    need(0 <= t.fixed_rate <= 100, "taco.fixed_rate", t.fixed_rate, "0 .. 100")
    need(0 <= t.lsf_tolerance <= 1, "taco.lsf_tolerance", t.lsf_tolerance, "0 .. 1")
    need(0 < t.switch_confidence <= 1, "taco.switch_confidence", t.switch_confidence, "0 < x <= 1")
    need(t.task_width >= 1 and t.seg_width >= 1, "taco.task_width", t.task_width,
         ">= 1 (and taco.seg_width >= 1)")
    need(t.eval_images is None or t.eval_images >= 1, "taco.eval_images", t.eval_images,
         "null (all test images) or >= 1")
    need(link.images >= 1, "taco.link.images", link.images, ">= 1")
    need(link.mcs == "auto" or 0 <= link.mcs < MCS_ROWS, "taco.link.mcs", link.mcs,
         f"'auto' (per SNR) or a row index 0 .. {MCS_ROWS - 1} of models.digital_phy.MCS_TABLE")
    need(bool(link.channels) and all(k in LINK_CHANNELS for k in link.channels),
         "taco.link.channels", link.channels,
         "a non-empty list of " + ", ".join(repr(m) for m in LINK_CHANNELS))


def check_source(cfg: ExperimentConfig) -> None:
    """The checks that need the source read: run by the server before the codec trains
    and by a client before it loads its share. Labels are needed (the classifier, LSF,
    GradCAM); masks are not (without them the task switch is off, models/taco/task.py)."""
    from common import data  # torch: not at config time

    data.require(cfg.data, NEEDS)
