"""Phase 2's task-oriented feedback (arXiv 2505.07980, Sec. III-C): what the receiver's
task model asks the transmitter for, and how it crosses the link.

- "class": the requested class id, one byte (two with more than 256 object classes).
- "text": a short English prompt naming the object the receiver wants, with its colour
  in the reconstruction where the received map puts it ("a red circle"), UTF-8. It is
  what a text-image model (CLIP) at the transmitter turns into an attention map; the
  transmitter reads only these bytes.

With class feedback and CLIP attention the transmitter writes the prompt itself from
the class name (`prompt`), so both ends phrase a class the same way. Class names and
colour names are the source's (`classes.MaskClasses`: the synthetic scenes' shapes and
colours, a real source's class names or "class k" and the basic colour terms); the
helpers default to the synthetic scenes'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.diffusion import codec
from models.diffusion.classes import SYNTHETIC, MaskClasses
from models.diffusion.model import DiffusionSemCom

# Fewer pixels than this of the requested class in the reconstruction: its colour is
# left out of the prompt (a handful of pixels is mostly the class boundary's blur).
MIN_COLOUR_PIXELS = 4
MAX_TEXT_BYTES = 255  # a prompt is a few words; more is a malformed message


def prompt(class_id: int, colour: str | None = None,
           names: tuple[str, ...] = SYNTHETIC.names) -> str:
    """The English prompt for object class `class_id` (mask id - 1) of `names`, e.g.
    "a red circle" or "a circle"."""
    return f"a {colour} {names[class_id]}" if colour else f"a {names[class_id]}"


def nearest_colour(rgb: Tensor, colours: dict[str, tuple[float, float, float]] = SYNTHETIC.colours
                   ) -> str:
    """The colour name of `colours` nearest (Euclidean, RGB) to a mean colour [3]."""
    names = list(colours)
    palette = torch.tensor([colours[n] for n in names], device=rgb.device)
    return names[int(((palette - rgb) ** 2).sum(1).argmin())]


@torch.no_grad()
def receiver_request(model: DiffusionSemCom, recon: Tensor, seg_small: Tensor,
                     classes: MaskClasses = SYNTHETIC) -> tuple[Tensor, list[str]]:
    """What the receiver asks for after phase 2 [B]: the object class over the most cells
    of the class map it received (`seg_small` [B, s, s]), or, where that map holds no
    object, its task net's top class on the reconstruction [B, 3, S, S]; and a prompt for
    it with the mean colour of the reconstruction where the map puts that class.

    The map, not the task net's view of x_hat_1: the 8x8 map regenerates blocky shapes,
    and a task net asking from the reconstruction named a class the scene lacked in 36 %
    of the quickstart's scenes (an attention mask for an absent class sends nothing of
    use)."""
    area = F.one_hot(seg_small, classes.count).flatten(1, 2).sum(1)[:, 1:]  # [B, objects]
    fallback = model.task_net(recon)[2].argmax(1)
    requested = torch.where(area.amax(1) > 0, area.argmax(1), fallback)
    region = codec.upsample_classes(seg_small, recon.shape[-1]) == (requested + 1)[:, None, None]
    texts = []
    for c, img, where in zip(requested.tolist(), recon, region):
        colour = (nearest_colour(img[:, where].mean(1), classes.colours)
                  if int(where.sum()) >= MIN_COLOUR_PIXELS else None)
        texts.append(prompt(c, colour, classes.names))
    return requested, texts


def _class_bytes(objects: int) -> int:
    return 1 if objects <= 256 else 2


def encode_class(class_id: int, objects: int = SYNTHETIC.objects) -> bytes:
    """Object class `class_id` of `objects` as one byte (two above 256 classes)."""
    return int(class_id).to_bytes(_class_bytes(objects), "big")


def decode_class(payload: bytes, objects: int = SYNTHETIC.objects) -> int:
    width = _class_bytes(objects)
    value = int.from_bytes(payload, "big") if len(payload) == width else objects
    if value >= objects:
        raise ValueError(f"class feedback must be {('one byte', 'two bytes')[width - 1]} below "
                         f"{objects}, got {payload[:8]!r} ({len(payload)} bytes)")
    return value


def encode_text(text: str) -> bytes:
    payload = text.encode("utf-8")
    if not 0 < len(payload) <= MAX_TEXT_BYTES:
        raise ValueError(f"a text feedback of {len(payload)} bytes: expected 1..{MAX_TEXT_BYTES}")
    return payload


def decode_text(payload: bytes) -> str:
    if not 0 < len(payload) <= MAX_TEXT_BYTES:
        raise ValueError(f"a text feedback of {len(payload)} bytes: expected 1..{MAX_TEXT_BYTES}")
    return payload.decode("utf-8")  # strict: malformed bytes are an error, not a guess
