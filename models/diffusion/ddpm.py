"""Conditional DDPM of the receiver (arXiv 2505.07980, Sec. III-C), with diffusers.

Training (Ho et al. 2020, Eq. 14 there): L = E ||eps - eps_theta(sqrt(a_t) x_0 +
sqrt(1 - a_t) eps, t, c)||^2 with the conditions c = (x_seg, x_att) concatenated to the
noisy image as channels, diffusers' `DDPMScheduler` adding the noise. Sampling: DDIM
(Song et al. 2021, eta = 0: deterministic given the initial noise) in
`diffusion.sample_steps` steps, optionally with classifier-free guidance (Ho &
Salimans 2022): eps = eps_u + w (eps_c - eps_u), the model trained with every condition
dropped for a share `cond_drop` of the examples.

The conditions: x_seg as a one-hot class map (one channel per segmentation class of the
source, background included: 5 for the synthetic scenes; the phase-1 map upsampled by
nearest neighbour) and x_att (1 channel): zero in phase 1, the masked edges in phase 3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import Tensor

from common.config import ExperimentConfig
from common.data import seg_classes
from models.diffusion.codec import downsample_classes, edge_map, upsample_classes
from models.diffusion.config import DiffusionConfig


def cond_channels(cfg: ExperimentConfig) -> int:
    """Channels of the conditions: the source's segmentation classes, and x_att."""
    return seg_classes(cfg.data) + 1


def make_unet(cfg: ExperimentConfig, in_channels: int) -> UNet2DModel:
    """The conditional UNet: attention at the lowest resolution (S/4)."""
    dc = cfg.diffusion
    return UNet2DModel(
        sample_size=cfg.data.image_size, in_channels=in_channels, out_channels=3,
        block_out_channels=tuple(dc.block_out_channels), layers_per_block=dc.layers_per_block,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=dc.block_out_channels[-1] // 2)


def noise_scheduler(dc: DiffusionConfig) -> DDPMScheduler:
    # The cosine schedule (Nichol & Dhariwal 2021) keeps small images from being
    # almost pure noise over the last third of the steps, as the linear one does.
    return DDPMScheduler(num_train_timesteps=dc.train_timesteps,
                         beta_schedule="squaredcos_cap_v2",
                         prediction_type=dc.prediction_type)


def conditions(seg_full: Tensor, x_att: Tensor, num_classes: int) -> Tensor:
    """c = (one-hot x_seg [num_classes channels], x_att [1 channel]) as
    [B, num_classes + 1, S, S]."""
    one_hot = F.one_hot(seg_full.long(), num_classes).permute(0, 3, 1, 2).float()
    return torch.cat([one_hot, x_att[:, None].float()], 1)


def training_conditions(image: Tensor, seg: Tensor, dc: DiffusionConfig,
                        generator: torch.Generator, num_classes: int) -> Tensor:
    """Conditions as the receiver will see them, from a scene's true mask: the phase-1
    map (downsampled, upsampled back) and, for a third of the examples each, no edges
    (phase 1), all edges, or the edges inside one object's dilated mask (a stand-in
    for a CAM region: the attention is not known while the DDPM trains). `num_classes`:
    the source's segmentation classes, background included."""
    size, b = image.shape[-1], image.shape[0]
    dev = image.device
    seg_full = upsample_classes(downsample_classes(seg, dc.seg_downsample, num_classes), size)
    edges = edge_map(image, dc.edge_threshold)
    mode = torch.randint(0, 3, (b,), generator=generator).to(dev)
    # One present object class per example (background if there is none).
    present = F.one_hot(seg.long(), num_classes).flatten(1, 2).amax(1)[:, 1:].float()
    pick = torch.multinomial(present.cpu() + 1e-6, 1, generator=generator)[:, 0].to(dev) + 1
    region = (seg == pick[:, None, None]).float()[:, None]
    kernel = 2 * int(torch.randint(1, 5, (1,), generator=generator)) + 1
    region = F.max_pool2d(region, kernel, stride=1, padding=kernel // 2)[:, 0]
    keep = torch.where(mode[:, None, None] == 0, torch.zeros_like(region),
                       torch.where(mode[:, None, None] == 1, torch.ones_like(region), region))
    cond = conditions(seg_full, edges * keep, num_classes)
    if dc.cond_drop > 0:
        drop = (torch.rand(b, generator=generator) < dc.cond_drop).to(dev)
        cond = torch.where(drop[:, None, None, None], torch.zeros_like(cond), cond)
    return cond


def denoising_loss(unet: torch.nn.Module, image: Tensor, cond: Tensor,
                   scheduler: DDPMScheduler, generator: torch.Generator) -> Tensor:
    """The simple DDPM loss (module docstring) on images in [0, 1]; with
    `diffusion.prediction_type` "sample" the target is x_0, with "v_prediction" it is
    v = sqrt(a_t) eps - sqrt(1 - a_t) x_0."""
    x0 = image * 2 - 1
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],),
                      generator=generator).to(x0.device)
    noisy = scheduler.add_noise(x0, noise, t)
    kind = scheduler.config.prediction_type
    target = (noise if kind == "epsilon" else x0 if kind == "sample"
              else scheduler.get_velocity(x0, noise, t))
    return F.mse_loss(unet(torch.cat([noisy, cond], 1), t).sample, target)


@torch.no_grad()
def ddim_sample(unet: torch.nn.Module, cond: Tensor, cfg: ExperimentConfig, seed: int) -> Tensor:
    """Images [B, 3, S, S] in [0, 1] from p_theta(x_0 | c) by DDIM; the initial noise
    comes from `seed` alone, so the same seed and conditions give the same images."""
    dc = cfg.diffusion
    ddim = DDIMScheduler.from_config(noise_scheduler(dc).config)
    ddim.set_timesteps(dc.sample_steps)
    b, size = cond.shape[0], cfg.data.image_size
    x = torch.randn((b, 3, size, size), generator=torch.Generator().manual_seed(seed)).to(cond.device)
    guided = dc.guidance_scale != 1
    for t in ddim.timesteps:
        if guided:
            both = torch.cat([torch.cat([x, cond], 1), torch.cat([x, torch.zeros_like(cond)], 1)])
            eps_c, eps_u = unet(both, t).sample.chunk(2)
            eps = eps_u + dc.guidance_scale * (eps_c - eps_u)
        else:
            eps = unet(torch.cat([x, cond], 1), t).sample
        x = ddim.step(eps, t, x, eta=0.0).prev_sample
    return ((x.clamp(-1, 1) + 1) / 2).float()


def one_step_decode(decoder: torch.nn.Module, cond: Tensor) -> Tensor:
    """The deterministic baseline: the same conditions -> an image in one pass (a UNet of
    the same shape trained with MSE to the image, no noise, timestep 0)."""
    t = torch.zeros(cond.shape[0], dtype=torch.long, device=cond.device)
    return torch.sigmoid(decoder(cond, t).sample)
