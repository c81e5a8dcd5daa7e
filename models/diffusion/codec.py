"""What crosses the link, and its lossless coding (arXiv 2505.07980, Sec. III).

Phase 1 sends the segmentation map x_seg as a downsampled class map (a block majority
vote), run-length coded: with up to 8 classes (the synthetic scenes' 5) one byte per
run, class in the top 3 bits, run length - 1 in the low 5 (runs longer than 32 are
split); with more, the class in one byte (up to 256 classes) or two, then run length - 1
in one byte. Both ends know the class count (`common.data.seg_classes` of the
config), so the payload carries no header. Phase 3 sends x_att = M_A * x_edge
(Eq. M_A = 1[A > tau]) as its non-zero patches only: a 16-bit patch count, a 16-bit
location per patch and the patch's edge bits packed eight to a byte.

The edge map is Canny without hysteresis, written with torch ops (no OpenCV or
scikit-image here): Sobel gradients of the luminance, non-maximum suppression along
the gradient direction quantised to four bins, one threshold.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.diffusion.classes import SYNTHETIC

# The synthetic scenes' classes (background + the four shapes). The workload codes the
# source's own count, common.data.seg_classes (models/diffusion/classes.py).
SEG_CLASSES = SYNTHETIC.count
MAX_CLASSES = 1 << 16  # the widest run code holds a two-byte class


def _run_code(num_classes: int) -> tuple[int, int]:
    """(bytes per run, bits of run length - 1) of the run-length code for `num_classes`."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"a class map of {num_classes} classes: the code holds 1..{MAX_CLASSES}")
    if num_classes <= 8:
        return 1, 5
    return (2 if num_classes <= 256 else 3), 8


# ----------------------------------------------------------------------------- phase 1


def downsample_classes(seg: Tensor, factor: int, num_classes: int) -> Tensor:
    """[B, S, S] class ids -> [B, S/f, S/f]: the majority class of each f x f block
    (ties go to the higher class id, so small objects survive a background tie)."""
    if factor == 1:
        return seg.clone()
    votes = F.avg_pool2d(F.one_hot(seg.long(), num_classes).permute(0, 3, 1, 2).float(), factor)
    tie_break = torch.arange(num_classes, device=seg.device).view(1, -1, 1, 1) * 1e-4
    return (votes + tie_break).argmax(1)


def upsample_classes(small: Tensor, size: int) -> Tensor:
    """[B, s, s] class ids -> [B, S, S] by nearest neighbour (what the receiver conditions on)."""
    return F.interpolate(small[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


def encode_class_map(small: np.ndarray, num_classes: int) -> bytes:
    """Run-length code of one class map (row-major) of ids 0..num_classes-1."""
    width, run_bits = _run_code(num_classes)
    flat = np.asarray(small, dtype=np.int64).ravel()
    if flat.size == 0 or flat.min() < 0 or flat.max() >= num_classes:
        raise ValueError(f"class ids must lie in 0..{num_classes - 1}, got "
                         f"{flat.min() if flat.size else 'an empty map'}..{flat.max() if flat.size else ''}")
    change = np.flatnonzero(np.diff(flat)) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [flat.size]]))
    max_run = 1 << run_bits
    out = bytearray()
    for value, length in zip(flat[starts], lengths):
        while length > 0:
            run = min(length, max_run)
            out += ((int(value) << run_bits) | int(run - 1)).to_bytes(width, "big")
            length -= run
    return bytes(out)


def decode_class_map(payload: bytes, side: int, num_classes: int) -> np.ndarray:
    """The class map [side, side] of `encode_class_map`'s bytes."""
    width, run_bits = _run_code(num_classes)
    if len(payload) % width:
        raise ValueError(f"a class map payload of {len(payload)} bytes is not a whole number "
                         f"of {width}-byte runs")
    codes = np.frombuffer(payload, dtype=np.uint8).astype(np.int64).reshape(-1, width)
    codes = (codes << (8 * np.arange(width - 1, -1, -1))).sum(1)
    values = codes >> run_bits
    runs = (codes & ((1 << run_bits) - 1)) + 1
    if values.size and values.max() >= num_classes:
        raise ValueError(f"the class map payload holds class {values.max()}, expected "
                         f"0..{num_classes - 1}")
    flat = np.repeat(values, runs)
    if flat.size != side * side:
        raise ValueError(f"the class map payload decodes to {flat.size} cells, expected "
                         f"{side * side}")
    return flat.reshape(side, side)


# ----------------------------------------------------------------------------- edges


def edge_map(image: Tensor, threshold: float) -> Tensor:
    """[B, 3, S, S] in [0, 1] -> binary [B, S, S] edges (see the module docstring)."""
    luma = (0.299 * image[:, 0] + 0.587 * image[:, 1] + 0.114 * image[:, 2])[:, None]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=image.device)
    padded = F.pad(luma, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, kx.view(1, 1, 3, 3))[:, 0]
    gy = F.conv2d(padded, kx.t().contiguous().view(1, 1, 3, 3))[:, 0]
    mag = torch.hypot(gx, gy)
    # Direction bins 0, 45, 90, 135 degrees; keep a pixel that is no smaller than its two
    # neighbours across the edge.
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    bins = (((angle + 22.5) // 45) % 4).long()
    m = F.pad(mag[:, None], (1, 1, 1, 1))[:, 0]
    s = mag.shape[-1]

    def shifted(dy: int, dx: int) -> Tensor:
        return m[:, 1 + dy:1 + dy + s, 1 + dx:1 + dx + s]

    offsets = ((0, 1), (1, 1), (1, 0), (1, -1))  # (dy, dx) across the edge, per bin
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for b, (dy, dx) in enumerate(offsets):
        local_max = (mag >= shifted(dy, dx)) & (mag >= shifted(-dy, -dx))
        keep |= (bins == b) & local_max
    return (keep & (mag > threshold)).float()


def attention_mask(cam: Tensor, tau: float) -> Tensor:
    """M_A = 1[A > tau] (the paper's attention mask) on a CAM normalised to [0, 1]."""
    return (cam > tau).float()


def to_patches(x: Tensor, patch: int) -> Tensor:
    """[S, S] -> [S/p * S/p, p * p], patches in row-major order."""
    s = x.shape[-1]
    return x.reshape(s // patch, patch, s // patch, patch).permute(0, 2, 1, 3).reshape(-1, patch * patch)


def from_patches(patches: Tensor, side: int, patch: int) -> Tensor:
    n = side // patch
    return patches.reshape(n, n, patch, patch).permute(0, 2, 1, 3).reshape(side, side)


def encode_edge_patches(x_att: np.ndarray, patch: int) -> bytes:
    """The non-zero patches of one binary map x_att [S, S] and their locations."""
    tiles = to_patches(torch.as_tensor(np.asarray(x_att) != 0), patch).numpy()
    where = np.flatnonzero(tiles.any(axis=1))
    bits = np.packbits(tiles[where].astype(np.uint8), axis=None)
    return (np.uint16(len(where)).tobytes() + where.astype("<u2").tobytes() + bits.tobytes())


def decode_edge_patches(payload: bytes, side: int, patch: int) -> np.ndarray:
    """x_att [S, S] (float32 0/1) from `encode_edge_patches`' bytes; zero elsewhere."""
    count = int(np.frombuffer(payload[:2], dtype="<u2")[0])
    where = np.frombuffer(payload[2:2 + 2 * count], dtype="<u2").astype(np.int64)
    n_bits = count * patch * patch
    bits = np.unpackbits(np.frombuffer(payload[2 + 2 * count:], dtype=np.uint8))
    if len(payload) != 2 + 2 * count + (n_bits + 7) // 8 or where.size and where.max() >= (side // patch) ** 2:
        raise ValueError(f"an edge payload of {len(payload)} bytes does not hold {count} "
                         f"patches of {patch}x{patch} in a {side}x{side} map")
    tiles = np.zeros(((side // patch) ** 2, patch * patch), dtype=np.float32)
    tiles[where] = bits[:n_bits].reshape(count, patch * patch)
    return from_patches(torch.from_numpy(tiles), side, patch).numpy()


def patch_count(payload: bytes) -> int:
    return int(np.frombuffer(payload[:2], dtype="<u2")[0])
