"""The `diffusion` workload's config section (`diffusion:`) and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import LORA_STRATEGIES, ExperimentConfig, need

# Linear layers of diffusers' UNet2DModel that peft may adapt (the attention projections
# and the timestep projections of the ResNet blocks). Only Linear layers: svd_lora
# re-factorises 2-D factors.
UNET_LINEAR_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "time_emb_proj", "linear_1",
                       "linear_2")


@dataclass
class DiffusionConfig:
    """Segmentation map -> conditional DDPM -> feedback -> CAM-masked edges (the paper's
    three phases), with the DDPM pretrained on public scenes and fine-tuned with LoRA.

    Any source with segmentation masks will do (data.name synthetic, folder with
    data.masks_root, hf with a mask column); whether it has them is checked where the
    data is read (models/diffusion/classes.py), as checking a config reads no data."""

    # The pretrained DDPM (and the one-step baseline decoder): a local file, trained on
    # the source's public split (the public_samples examples after the clients') and
    # written there when missing. A node-only key (node config `diffusion-checkpoint`).
    checkpoint: str = "runs/diffusion/ddpm.pt"
    public_samples: int = 1500
    pretrain_steps: int = 800
    pretrain_batch_size: int = 32
    pretrain_lr: float = 2e-3
    baseline_steps: int = 400  # steps of the deterministic one-step decoder (report baseline)
    block_out_channels: list[int] = field(default_factory=lambda: [32, 48, 64])
    layers_per_block: int = 1
    train_timesteps: int = 1000  # DDPM forward process (linear betas)
    sample_steps: int = 20  # DDIM steps at the receiver
    guidance_scale: float = 1.0  # classifier-free guidance weight; 1 = off (one pass)
    # What the UNet predicts: "epsilon" (Ho et al. 2020), "sample" (x_0 itself) or
    # "v_prediction" (Salimans & Ho 2022). x_0 prediction makes the loss at high noise
    # depend on the conditions, so a short CPU pretraining learns to follow them.
    prediction_type: str = "epsilon"
    cond_drop: float = 0.1  # share of training examples with every condition zeroed (CFG)
    seg_downsample: int = 4  # the phase-1 class map is image_size / seg_downsample square
    edge_threshold: float = 0.5  # Sobel magnitude above which a local maximum is an edge
    edge_patch: int = 4  # phase-3 patches are edge_patch x edge_patch pixels
    tau: float = 0.5  # M_A = 1[A > tau] on the min-max normalised CAM
    tau_sweep: list[float] = field(default_factory=lambda: [0.2, 0.35, 0.5, 0.65, 0.8])
    eval_samples: int = 32  # test scenes per client that evaluate sends over the link
    private_width: int = 16  # channels of the private nets (segmentation, CAM, task net)
    private_lr: float = 2e-3
    # Extra passes per round over the client's scenes that train only the private nets
    # (segmentation, CAM classifier, receiver task net): they are cheap next to the
    # DDPM's LoRA step, and a handful of batches per round leaves them at background.
    private_epochs: int = 0
    # Phase 2's feedback: "class" (the requested class id, one byte) or "text" (a short
    # English prompt such as "a red circle", UTF-8). Phase 3's attention: "cam" (Grad-CAM
    # of the transmitter's classifier) or "clip" (Grad-CAM of a CLIP vision encoder for
    # the prompt). Free text and CLIP need a local CLIP checkpoint.
    feedback: str = "class"
    attention: str = "cam"
    # A local directory holding a transformers CLIPModel with its tokenizer and image
    # processor (save_pretrained); "" = none. Loaded offline only, never downloaded. A
    # node-only key (node config `diffusion-clip-checkpoint`).
    clip_checkpoint: str = ""


SECTIONS = {"diffusion": DiffusionConfig}
SPLIT = False
STRATEGIES = LORA_STRATEGIES  # it shares the UNet's LoRA adapters


def check(cfg: ExperimentConfig) -> None:
    dc, d = cfg.diffusion, cfg.data
    need(cfg.strategy.name in STRATEGIES, "strategy.name", cfg.strategy.name,
         f"one of {list(STRATEGIES)} for workload 'diffusion' (it shares LoRA adapters)")
    need(d.image_size % 8 == 0, "data.image_size", d.image_size,
         "a multiple of 8 (the UNet halves it twice; e.g. 32)")
    need(len(dc.block_out_channels) == 3 and all(c >= 8 and c % 8 == 0
                                                  for c in dc.block_out_channels),
         "diffusion.block_out_channels", dc.block_out_channels,
         "three multiples of 8 (e.g. [32, 48, 64]; GroupNorm uses 8 groups)")
    need(dc.layers_per_block >= 1, "diffusion.layers_per_block", dc.layers_per_block, ">= 1")
    bad = [m for m in cfg.lora.target_modules if m not in UNET_LINEAR_MODULES]
    need(not bad, "lora.target_modules", cfg.lora.target_modules,
         f"names drawn from {list(UNET_LINEAR_MODULES)} for workload 'diffusion' (the "
         "UNet's Linear layers)")
    need(not cfg.lora.client_ranks, "lora.client_ranks", cfg.lora.client_ranks,
         "empty for workload 'diffusion' (every client adapts the UNet at lora.rank)")
    if cfg.strategy.name == "svd_lora":
        need(cfg.strategy.svd_rank == cfg.lora.rank, "strategy.svd_rank", cfg.strategy.svd_rank,
             f"lora.rank ({cfg.lora.rank}) for workload 'diffusion'")
    need(cfg.privacy.dp.mode == "off", "privacy.dp.mode", cfg.privacy.dp.mode,
         "'off' for workload 'diffusion' (DP training of the DDPM is not built)")
    need(bool(dc.checkpoint), "diffusion.checkpoint", dc.checkpoint,
         "a local file path (it is trained and written there when missing)")
    need(dc.public_samples >= 10, "diffusion.public_samples", dc.public_samples, ">= 10")
    for key in ("pretrain_steps", "pretrain_batch_size", "baseline_steps", "sample_steps",
                "eval_samples", "private_width"):
        need(getattr(dc, key) >= 1, f"diffusion.{key}", getattr(dc, key), ">= 1")
    need(dc.train_timesteps >= 10, "diffusion.train_timesteps", dc.train_timesteps, ">= 10")
    need(dc.sample_steps <= dc.train_timesteps, "diffusion.sample_steps", dc.sample_steps,
         f"<= diffusion.train_timesteps ({dc.train_timesteps})")
    need(dc.pretrain_lr > 0, "diffusion.pretrain_lr", dc.pretrain_lr, "> 0")
    need(dc.prediction_type in ("epsilon", "sample", "v_prediction"), "diffusion.prediction_type",
         dc.prediction_type, "'epsilon', 'sample' or 'v_prediction'")
    need(dc.private_lr > 0, "diffusion.private_lr", dc.private_lr, "> 0")
    need(dc.private_epochs >= 0, "diffusion.private_epochs", dc.private_epochs,
         ">= 0 (extra private-net passes per round)")
    need(dc.guidance_scale >= 1, "diffusion.guidance_scale", dc.guidance_scale,
         ">= 1 (1: no classifier-free guidance)")
    need(0 <= dc.cond_drop < 1, "diffusion.cond_drop", dc.cond_drop, "0 <= x < 1")
    need(dc.guidance_scale == 1 or dc.cond_drop > 0, "diffusion.guidance_scale",
         dc.guidance_scale, "1 unless diffusion.cond_drop > 0 (guidance needs an "
         "unconditional model)")
    need(dc.seg_downsample >= 1 and d.image_size % dc.seg_downsample == 0,
         "diffusion.seg_downsample", dc.seg_downsample,
         f"a divisor of data.image_size ({d.image_size})")
    need(dc.edge_patch >= 1 and d.image_size % dc.edge_patch == 0, "diffusion.edge_patch",
         dc.edge_patch, f"a divisor of data.image_size ({d.image_size})")
    need((d.image_size // dc.edge_patch) ** 2 <= 65536, "diffusion.edge_patch", dc.edge_patch,
         "large enough for at most 65536 patches (locations are 16-bit)")
    need(dc.edge_threshold > 0, "diffusion.edge_threshold", dc.edge_threshold, "> 0")
    need(0 <= dc.tau < 1, "diffusion.tau", dc.tau, "0 <= x < 1 (the CAM is normalised to [0, 1])")
    need(all(0 <= t < 1 for t in dc.tau_sweep), "diffusion.tau_sweep", dc.tau_sweep,
         "values in [0, 1)")
    _check_clip(dc)


def _check_clip(dc: DiffusionConfig) -> None:
    """The CLIP path's keys. Whether the directory holds a CLIP is checked where it is
    loaded (models/diffusion/clip_attention.py): the key is the node's, and the server
    need not have the node's files."""
    need(dc.feedback in ("class", "text"), "diffusion.feedback", dc.feedback, "'class' or 'text'")
    need(dc.attention in ("cam", "clip"), "diffusion.attention", dc.attention, "'cam' or 'clip'")
    need(isinstance(dc.clip_checkpoint, str), "diffusion.clip_checkpoint", dc.clip_checkpoint,
         "a local directory path, or '' for none")
    for key, value, wants in (("diffusion.attention", dc.attention, "clip"),
                              ("diffusion.feedback", dc.feedback, "text")):
        need(value != wants or dc.clip_checkpoint, key, value,
             f"'{wants}' only with a local CLIP: set 'diffusion.clip_checkpoint' to a directory "
             "holding a transformers CLIPModel with its tokenizer and image processor "
             "(save_pretrained), or use "
             + ("'cam'" if wants == "clip" else "'class'"))
    # Grad-CAM scores a class of the transmitter's classifier, which a prompt does not name.
    need(dc.feedback == "class" or dc.attention == "clip", "diffusion.feedback", dc.feedback,
         "'class' with diffusion.attention='cam' (Grad-CAM needs a class; free text needs "
         "diffusion.attention='clip')")
