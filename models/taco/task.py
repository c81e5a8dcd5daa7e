"""The client's task models and TACO's task-specific mask.

The classifier is the downstream model of the first task (the transmitter runs it for
GradCAM and LSF, the receiver on x_hat); the segmenter is the second task a receiver
switches to (Sec. IV-C: a new task after a classification-optimised transmission).
Both are private: they are trained on the client's labels and never leave it.

The task switch needs segmentation masks twice: to train the segmenter, whose output
is what the receiver requests positions by, and as the truth its IoU is scored
against. Nothing else a labelled source has stands in for them: GradCAM of the
classifier is the first task's own mask, the one the transmitter already sent by, so
a "segmenter" trained on it would only ask for what LSF judged unneeded, and score
itself against itself. A source without masks therefore runs with the switch off
(`switch_mode`, logged once): no segmenter, no switch metrics.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import data
from common.config import DataConfig
from models.taco.codec import DOWNSAMPLE

log = logging.getLogger("fedsemcom")

# What the task switch segments (`switch_mode`).
SWITCH_CLASS = "class"  # the class the receiver predicted: mask id = label + 1
SWITCH_FOREGROUND = "foreground"  # every object: mask ids 1 .. seg_classes - 1
_logged: set[tuple[str, str]] = set()  # (source, message): what was logged in this process


def switch_mode(data_cfg: DataConfig) -> str | None:
    """What the task switch segments on this source, from what it annotates:

    SWITCH_CLASS       mask id k is label k - 1 (the synthetic scenes; a real source
                       whose data.seg_class_names are its class names): the predicted
                       class's pixels
    SWITCH_FOREGROUND  masks whose ids are not known to be the labels' (a folder's
                       labels are its sorted sub-folder names, whatever ids its masks
                       use): every non-background pixel
    None               no masks: the switch is off (module docstring)

    The choice is logged once per source when it is not SWITCH_CLASS."""
    if "segmentation" not in data.source_keys(data_cfg):
        try:
            data.require(data_cfg, {"segmentation": "task switch"})
        except data.DataError as err:  # always, without masks: its text says how to add them
            _log_once(data_cfg, f"taco: {err}. This run has the task switch off: no "
                                "segmenter is trained, and switch_iou_before, "
                                "switch_iou_after and switch_extra_kb are not measured")
        return None
    if data.mask_ids_are_labels(data_cfg):
        return SWITCH_CLASS
    _log_once(data_cfg, f"taco: data.name={data_cfg.name!r} does not say that mask id k is "
                        "label k - 1 (set data.seg_class_names to its class names, in "
                        "order, where it is), so the task switch segments every "
                        "non-background pixel instead of the predicted class")
    return SWITCH_FOREGROUND


def _log_once(data_cfg: DataConfig, message: str) -> None:
    """Log once per process: every client builds a model for every message."""
    key = (data.source_fingerprint(data_cfg), message)
    if key not in _logged:
        _logged.add(key)
        log.warning(message)


def segment(ids: Tensor, requested_class: int, foreground: bool = False) -> Tensor:
    """The pixels of `ids` (mask ids) in the segment the switch asks for: the requested
    class (id requested_class + 1), or with `foreground` every non-background id."""
    return ids > 0 if foreground else ids == requested_class + 1


def norm_layer(channels: int) -> nn.Module:
    """GroupNorm: normalises each example on its own, so a batch of one (the
    transmitter's GradCAM, the receiver's x_hat) is scored as in a larger batch, and it
    learns quickly on a few hundred images."""
    return nn.GroupNorm(4, channels)


class TaskClassifier(nn.Module):
    """A small CNN; its last conv block works at the latent grid's resolution (1/4), so
    its GradCAM map has one value per latent position before any resizing."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), norm_layer(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), norm_layer(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), norm_layer(4 * w), nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), norm_layer(4 * w), nn.ReLU(),
        )
        self.head = nn.Linear(4 * w, classes)

    @property
    def cam_layer(self) -> nn.Module:
        return self.features[-1]

    def forward(self, x: Tensor) -> Tensor:
        # Global max pooling: the one object covers a few percent of a textured scene,
        # and a mean over space dilutes it (measured: 0.53-0.70 test accuracy after 6
        # epochs on 900 scenes with the mean, 0.95-0.97 with the max).
        return self.head(self.features(x).amax(dim=(2, 3)))


class Segmenter(nn.Module):
    """Per-pixel classes (0 = background, then `classes` mask ids: class + 1 on the
    synthetic scenes) at full resolution; dilated convs see about 30 pixels, enough to
    tell the shapes apart."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        w = width
        layers: list[nn.Module] = [nn.Conv2d(3, w, 3, padding=1), norm_layer(w), nn.ReLU()]
        for d in (1, 2, 4, 8):
            layers += [nn.Conv2d(w, w, 3, padding=d, dilation=d), norm_layer(w), nn.ReLU()]
        layers.append(nn.Conv2d(w, classes + 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def gradcam_scores(classifier: TaskClassifier, images: Tensor, classes: Tensor) -> Tensor:
    """GradCAM (Selvaraju et al. 2017) of `classes` on `images`, pooled to the latent
    grid: the mean of each 4x4 pixel block, [B, H/4, W/4] (TACO Sec. III-A-2: the
    pixel-to-latent correspondence of a 4x CNN codec). pytorch-grad-cam min-max
    normalises every map to [0, 1]."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classifier.eval()
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    with torch.enable_grad(), GradCAM(model=classifier, target_layers=[classifier.cam_layer]) as cam:
        maps = cam(input_tensor=images, targets=targets)  # numpy [B, H, W]
    return F.avg_pool2d(torch.from_numpy(maps).float()[:, None], DOWNSAMPLE)[:, 0]


def top_mask(scores: Tensor, rate: int) -> Tensor:
    """M: the round(rate% of positions) with the highest scores (ties: raster order),
    as a bool mask of the scores' shape [H, W]."""
    flat = scores.reshape(-1)
    k = round(rate / 100 * flat.numel())
    order = torch.argsort(-flat, stable=True)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(scores.shape)


def random_mask(shape: tuple[int, int], count: int, generator: torch.Generator) -> Tensor:
    """`count` positions drawn uniformly without replacement (the random-mask baseline)."""
    n = shape[0] * shape[1]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:count]] = True
    return mask.reshape(shape)
