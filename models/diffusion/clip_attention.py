"""CLIP attention at the transmitter (arXiv 2505.07980, Sec. III-B: attention for
free-text feedback).

A = Grad-CAM (pytorch-grad-cam) of a CLIP vision encoder for a prompt: the score is
CLIP's image-text logit of the image against the prompt's text embedding, the layer
its last encoder block's first LayerNorm (the patch tokens that block's attention
mixes into the class token), the tokens reshaped to the patch grid. The library
resizes the map to the image and min-max normalises it per image, as for the CAM of
the classifier, so M_A = 1[A > tau] reads it the same way.

The CLIP is a local directory (`diffusion.clip_checkpoint`: a transformers CLIPModel
with its tokenizer and image processor, as save_pretrained writes them), loaded with
local_files_only: nothing is downloaded. It is frozen and stays on the node: it is
not part of the workload's model, so it is neither shared nor saved with the private
nets.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from common.config import resolve_path

NODE_KEY = "diffusion-clip-checkpoint"


@dataclass(frozen=True)
class LocalClip:
    model: nn.Module  # transformers CLIPModel, eval mode, frozen
    tokenizer: object
    mean: Tensor  # [3]: the image processor's normalisation
    std: Tensor  # [3]
    image_size: int  # the vision encoder's input side
    grid: int  # patches per side


def load_clip(path: str) -> LocalClip:
    """The CLIP of `diffusion.clip_checkpoint` (cached per directory)."""
    folder = resolve_path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"diffusion.clip_checkpoint={path!r}: no directory at {folder}. Point it (node "
            f"config {NODE_KEY}) at a local folder holding a transformers CLIPModel with its "
            "tokenizer and image processor, e.g. one written by save_pretrained; nothing is "
            "downloaded.")
    return _load(str(folder.resolve()))


@functools.lru_cache(maxsize=2)
def _load(folder: str) -> LocalClip:
    # Imported here: transformers takes seconds to import, and only the CLIP path needs it.
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    try:
        # fp32 whatever the saved dtype: the scenes and Grad-CAM's gradients are fp32.
        model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"diffusion.clip_checkpoint: {folder} cannot be read as a CLIP (a transformers "
            f"CLIPModel with its tokenizer and image processor): {type(err).__name__}: "
            f"{err}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    vision = model.config.vision_config
    return LocalClip(model, tokenizer, torch.tensor(processor.image_mean, dtype=torch.float32),
                     torch.tensor(processor.image_std, dtype=torch.float32), vision.image_size,
                     vision.image_size // vision.patch_size)


def pixel_values(clip: LocalClip, image: Tensor) -> Tensor:
    """[B, 3, S, S] in [0, 1] -> CLIP's input: resized to its side (bicubic, as its
    image processor does) and normalised with the processor's mean and std; in torch, so
    that the whole path stays differentiable."""
    side = clip.image_size
    x = F.interpolate(image, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = clip.mean.to(image.device), clip.std.to(image.device)
    return (x - mean[:, None, None]) / std[:, None, None]


@torch.no_grad()
def text_embeddings(clip: LocalClip, texts: list[str], device) -> Tensor:
    """Unit-norm CLIP text embeddings [T, D] of the prompts."""
    max_len = clip.model.config.text_config.max_position_embeddings
    tokens = clip.tokenizer(texts, padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt").to(device)
    out = clip.model.text_model(input_ids=tokens["input_ids"],
                                attention_mask=tokens["attention_mask"])
    return F.normalize(clip.model.text_projection(out.pooler_output), dim=-1)


class ImageTextLogits(nn.Module):
    """image [B, 3, S, S] in [0, 1] -> CLIP logits against fixed prompts [B, T]: the
    score Grad-CAM differentiates."""

    def __init__(self, clip: LocalClip, text_embeds: Tensor):
        super().__init__()
        self.clip, self.text_embeds = clip, text_embeds
        self.vision = clip.model.vision_model  # registered, so GradCAM finds its layers

    def forward(self, image: Tensor) -> Tensor:
        # CLIP's weights are frozen: an input that needs a gradient is what makes the
        # hooked activations carry one.
        pixels = pixel_values(self.clip, image).detach().requires_grad_(True)
        pooled = self.vision(pixel_values=pixels).pooler_output
        image_embeds = F.normalize(self.clip.model.visual_projection(pooled), dim=-1)
        return self.clip.model.logit_scale.exp() * image_embeds @ self.text_embeds.t()


def clip_attention(clip: LocalClip, image: Tensor, texts: list[str]) -> Tensor:
    """A for each image's prompt: [B, S, S] in [0, 1] (Grad-CAM of the CLIP vision
    encoder, at the image size, min-max normalised per image by pytorch-grad-cam)."""
    if len(texts) != len(image):
        raise ValueError(f"{len(texts)} prompts for {len(image)} images")
    clip.model.to(image.device)
    unique = list(dict.fromkeys(texts))  # each prompt encoded once per batch
    scorer = ImageTextLogits(clip, text_embeddings(clip, unique, image.device))
    grid = clip.grid

    def tokens_to_grid(tokens: Tensor) -> Tensor:
        # [B, 1 + grid^2, D] -> [B, D, grid, grid]: the class token has no place on the grid.
        return tokens[:, 1:].reshape(tokens.shape[0], grid, grid, -1).permute(0, 3, 1, 2)

    layer = clip.model.vision_model.encoder.layers[-1].layer_norm1
    with torch.enable_grad(), GradCAM(model=scorer, target_layers=[layer],
                                      reshape_transform=tokens_to_grid) as cam:
        maps = cam(input_tensor=image, targets=[ClassifierOutputTarget(unique.index(t))
                                                for t in texts])
    return torch.from_numpy(np.ascontiguousarray(maps)).float().to(image.device)
