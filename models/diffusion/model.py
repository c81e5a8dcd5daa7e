"""The models of the diffusion workload (arXiv 2505.07980, Fig. 1).

- `DiffusionSemCom.unet`: the receiver's conditional DDPM, a diffusers `UNet2DModel`
  whose input is the noisy image concatenated with the conditions (x_seg one-hot,
  x_att): it models p_theta(x_0 | x_seg, x_att). Its base weights come from the
  pretrained checkpoint and stay frozen; peft LoRA adapters on its Linear layers are
  what the clients fine-tune and share.
- `seg_net` (transmitter): the segmentation network that produces x_seg, trained on
  the client's own masks (the paper uses a ResNet backbone; a small U-Net here).
- `classifier` (transmitter): the client-local multi-label classifier (a head on the
  segmentation net's backbone) whose Grad-CAM is the attention A for the requested class.
- `task_net` (receiver): its task model on reconstructed images: segmentation (IoU of
  the requested class), depth (only where the source has depth maps: the synthetic
  scenes) and classification heads (the scene's main object class; it picks the
  feedback only when the received class map holds no object).

The class counts are the source's (models/diffusion/classes.py): one segmentation
output per mask class, background included, and one classifier output per object class.

Everything but the adapters stays on the client (`workload.shared_state`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import Tensor, nn

from common.config import ExperimentConfig
from common.seeding import seeded
from models.diffusion.classes import mask_classes
from models.diffusion.ddpm import cond_channels, make_unet
from models.diffusion.pretrain import load_pretrained

LORA = ".lora_"


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm: per-example statistics, the steadier choice with ~160 scenes per client
    # and batches of a few scenes.
    return nn.GroupNorm(4 if channels % 4 == 0 else 1, channels)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), _norm(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), _norm(cout), nn.ReLU())


class SmallUNet(nn.Module):
    """Three-level U-Net (Ronneberger et al. 2015) with per-pixel outputs; `bottleneck`
    is the deepest feature map (S/4), which the receiver's class head pools."""

    def __init__(self, out_channels: int, width: int):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3 = _block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.dec2, self.dec1 = _block(6 * w, 2 * w), _block(3 * w, w)
        self.out = nn.Conv2d(w, out_channels, 1)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The decoder's maps at S and S/2 (d1, d2) and the bottleneck e3 (S/4)."""
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up(e3), e2], 1))
        d1 = self.dec1(torch.cat([self.up(d2), e1], 1))
        return d1, d2, e3

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        d1, _, e3 = self.features(x)
        return self.out(d1), e3


class SegmentationNet(nn.Module):
    """Transmitter: image [B,3,S,S] in [0,1] -> class logits [B, seg_classes, S, S]."""

    def __init__(self, width: int, seg_classes: int):
        super().__init__()
        self.net = SmallUNet(seg_classes, width)

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)[0]


class CamClassifier(nn.Module):
    """Transmitter: the multi-label classifier whose Grad-CAM (Selvaraju et al. 2017) is
    the attention map A. One logit per class, trained with BCE on the classes present
    in the scene (`presence`): a scene holds up to three objects, and a softmax over one
    label per scene teaches the other objects to count against their own class.

    It is a head (global average pooling, one linear layer) on the transmitter's
    segmentation backbone, as the paper's transmitter shares one ResNet backbone: the
    layer the CAM reads (`cam_layer`) is that U-Net's decoder at S/2 (16x16 for 32x32
    scenes), whose features the masks train pixel by pixel. With a trunk of its own
    learnt from a client's ~160 scenes, its top class was in the scene for 72% of the
    test scenes and 53% of the CAM mask at tau 0.5 lay on the requested class (dilated
    by a patch); on the shared backbone, 95% and 72% (quickstart, seed 0)."""

    def __init__(self, backbone: SmallUNet, width: int, classes: int):
        super().__init__()
        self.backbone = backbone  # shared with the segmentation net
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))

    @property
    def cam_layer(self) -> nn.Module:
        return self.backbone.dec2

    def forward(self, image: Tensor) -> Tensor:
        return self.head(self.backbone.features(image)[1])


def presence(seg: Tensor, classes: int) -> Tensor:
    """[B, S, S] segmentation ids -> [B, classes] multi-hot of the object classes
    present (segmentation id = class + 1; background left out): the CAM classifier's
    target."""
    return F.one_hot(seg.long(), classes + 1).flatten(1, 2).amax(1)[:, 1:].float()


class ReceiverTaskNet(nn.Module):
    """Receiver: segmentation logits [B, seg_classes, S, S], depth [B, S, S] (None
    without a depth head) and object class logits [B, seg_classes - 1] of an image
    (real while it trains, reconstructed when it is scored)."""

    def __init__(self, width: int, seg_classes: int, depth: bool = True):
        super().__init__()
        self.seg_classes, self.depth = seg_classes, depth
        self.net = SmallUNet(seg_classes + int(depth), width)
        self.class_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                        nn.Linear(4 * width, seg_classes - 1))

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        maps, bottleneck = self.net(image)
        c = self.seg_classes
        # Depth as a positive number through softplus (scenes' depths are about 1..10).
        depth = nn.functional.softplus(maps[:, c]) + 1e-3 if self.depth else None
        return maps[:, :c], depth, self.class_head(bottleneck)


class DiffusionSemCom(nn.Module):
    def __init__(self, cfg: ExperimentConfig, unet: nn.Module):
        super().__init__()
        classes = mask_classes(cfg.data)
        w = cfg.diffusion.private_width
        self.classes = classes  # the source's mask classes (models/diffusion/classes.py)
        self.unet = unet
        self.seg_net = SegmentationNet(w, classes.count)
        self.classifier = CamClassifier(self.seg_net.net, w, classes.objects)
        self.task_net = ReceiverTaskNet(w, classes.count, classes.depth)


def private_parameters(model: DiffusionSemCom) -> list[nn.Parameter]:
    """The private nets' parameters, each once (the classifier shares the segmentation
    net's backbone)."""
    return list({id(p): p for m in (model.seg_net, model.classifier, model.task_net)
                 for p in m.parameters()}.values())


def lora_unet(cfg: ExperimentConfig, lora_rank: int | None = None) -> nn.Module:
    """The pretrained conditional UNet, base frozen, with peft LoRA adapters whose A
    factors come from the shared `lora.init_seed` (B starts at zero: the model starts
    exactly at the pretrained one)."""
    unet = make_unet(cfg, 3 + cond_channels(cfg))
    unet.load_state_dict(load_pretrained(cfg)["unet"])
    for p in unet.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=lora_rank or cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                      lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules))
    with seeded(cfg.lora.init_seed):
        inject_adapter_in_model(lora, unet)
    return unet


def build(cfg: ExperimentConfig, device: torch.device | str = "cpu",
          lora_rank: int | None = None) -> DiffusionSemCom:
    """The client's whole system: the LoRA-adapted UNet and the private nets (seeded,
    so every party builds the same starting point). Needs the pretrained checkpoint."""
    unet = lora_unet(cfg, lora_rank)
    with seeded(cfg.seed + 5):
        model = DiffusionSemCom(cfg, unet)
    return model.to(device)


def set_trainable(model: DiffusionSemCom, lora_train: str) -> None:
    """FFA-LoRA freezes A; every B and every private net stays trainable."""
    for name, p in model.unet.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(lora_train == "ab")
        elif "lora_B" in name:
            p.requires_grad_(True)
