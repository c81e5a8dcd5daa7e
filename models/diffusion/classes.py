"""What the diffusion workload reads from its data source: the classes of the masks
(phase 1's class map, the CAM classifier, the feedback and its prompts) and whether
there is depth.

- Classes: `common.data.seg_classes` (background id 0 included). Mask id k >= 1 is
  named by `common.data.seg_class_names`: the shapes for the synthetic scenes,
  `data.seg_class_names` where the user gives them, else "class k" (a mask file does not
  say what its ids mean).
- The receiver's class head learns each scene's main object class (0-based: mask id
  - 1), which is also what its feedback falls back to. The synthetic scenes' label is
  exactly that (the class of the largest object); a real source's is read from its
  masks (the object class over the most pixels, `main_object`), because its labels
  need not be the masks' classes: an image folder numbers its class sub-folders in
  sorted order, whatever ids the masks use. So the workload needs masks, not labels.
- Depth: only the synthetic scenes have depth maps. Elsewhere the receiver's depth head
  and the depth metrics are switched off (`note_depth` logs why): a depth map guessed
  from the image by another network would be scored as if it were the truth.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from common import data
from common.config import DataConfig
from common.data import DataError
from common.data.scenes import CLASSES, COLORS

log = logging.getLogger("fedsemcom")

NEEDS = {"segmentation": "diffusion"}  # load_partition(needs=...): phase 1 sends a mask

# The colour names a prompt may use for a real source's images: the eleven basic colour
# terms (Berlin & Kay 1969), the synthetic scenes' six at their painted values.
BASIC_COLOURS: dict[str, tuple[float, float, float]] = {
    **COLORS, "black": (0.05, 0.05, 0.05), "gray": (0.50, 0.50, 0.50),
    "brown": (0.50, 0.30, 0.15), "orange": (0.95, 0.55, 0.10), "pink": (0.95, 0.60, 0.75)}


@dataclass(frozen=True, eq=False)
class MaskClasses:
    """The mask classes of one source, as both ends of the link name them."""

    count: int  # segmentation classes, background (id 0) included
    names: tuple[str, ...]  # names[k - 1]: the name of mask id k
    colours: dict[str, tuple[float, float, float]] = field(repr=False)  # prompts' palette
    label_is_main_object: bool  # the source's label is the main object's class (synthetic)
    depth: bool  # the source has depth maps

    @property
    def objects(self) -> int:
        """Object classes: the CAM classifier's and the class head's outputs."""
        return self.count - 1


SYNTHETIC = MaskClasses(1 + len(CLASSES), CLASSES, COLORS, True, True)


def mask_classes(data_cfg: DataConfig) -> MaskClasses:
    """The source's mask classes; a DataError, naming how to add masks, when it has none."""
    if data_cfg.name == "synthetic":
        return SYNTHETIC
    data.require(data_cfg, NEEDS)
    count = data.seg_classes(data_cfg)
    if count < 2:
        raise DataError(f"data.name={data_cfg.name!r}: its masks hold only background (id 0), "
                        "and workload 'diffusion' needs at least one object class: give "
                        "masks with object ids 1.. (or set data.seg_classes)")
    keys = data.source_keys(data_cfg)
    return MaskClasses(count, data.seg_class_names(data_cfg), BASIC_COLOURS, False,
                       "depth" in keys)


def main_object(batch: dict[str, Tensor], classes: MaskClasses) -> Tensor:
    """[B]: each scene's main object class (0-based; -1 where its mask holds no object),
    what the receiver's class head learns and its accuracy is scored on (module
    docstring)."""
    if classes.label_is_main_object:
        return batch["label"]
    area = F.one_hot(batch["segmentation"].long(), classes.count).sum((1, 2))[:, 1:]
    return torch.where(area.amax(1) > 0, area.argmax(1), torch.full_like(area[:, 0], -1))


def note_depth(data_cfg: DataConfig) -> None:
    """Log, once per process and source, that depth is off where the source has none."""
    if data_cfg.name != "synthetic" and not mask_classes(data_cfg).depth:
        _note_once(data_cfg.name, data.source_fingerprint(data_cfg))


@functools.lru_cache(maxsize=None)
def _note_once(name: str, fingerprint: str) -> None:
    log.warning("workload 'diffusion' on data.name=%r: the source has no depth maps (only the "
                "synthetic scenes do), so the receiver's depth head and the depth_* metrics "
                "are off", name)
