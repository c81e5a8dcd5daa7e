"""The separate source-channel coding baseline every deep-JSCC result is judged
against: a standard image codec, then a standard channel code.

    image -> JPEG, WebP or AVIF (Pillow) at the largest quality whose bytes fit the
    channel-use budget after LDPC + QAM at this SNR (models/digital_phy.py)
    -> transport block -> channel -> LDPC decoding -> CRC -> codec decoder -> image

The budget is the learned transmitter's: the same complex channel symbols per image
(the bandwidth ratio of the deep-JSCC literature). What the receiver does without a
good block: the image whose block failed its CRC is *lost*, the one for which not even
quality 1 fits the budget is *unsent*; both get the receiver's fallback (the mean
training image) and are counted. The task heads then read the received image as they
would read an image taken at the receiver.

The transport block carries one byte of quality and two of length before the codec's
bytes. For JPEG it carries only the entropy-coded scan: the header before it (the
quantisation tables of that quality, the standard Huffman tables, the frame size) is
the same for every image of a size and quality, so the receiver rebuilds it from the
quality, as an abbreviated JPEG stream (ITU T.81, Annex B.5) lets a link do. WebP's and
AVIF's containers are sent as Pillow writes them (about 30 and 300 bytes): at 32x32
pixels AVIF's container alone costs more than many budgets, and the report shows that.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from models import digital_phy as phy
from models.channel import WirelessChannel

CODECS = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}
QUALITIES = range(1, 101)
HEADER_BYTES = 3  # quality (1 byte), codec bytes (2 bytes, big-endian)
_SOS = b"\xff\xda"  # JPEG start-of-scan marker


def to_uint8(image: Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8 (what a codec reads)."""
    return (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def from_uint8(pixels: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255


def _pillow_encode(pixels: np.ndarray, codec: str, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, CODECS[codec], quality=quality)
    return buf.getvalue()


def _scan_start(jpeg: bytes) -> int:
    """The offset just past the start-of-scan segment's header."""
    sos = jpeg.index(_SOS)
    return sos + 2 + int.from_bytes(jpeg[sos + 2: sos + 4], "big")


@functools.lru_cache(maxsize=512)
def _jpeg_header(quality: int, height: int, width: int) -> bytes:
    """Everything before the entropy-coded scan of a height x width JPEG at `quality`."""
    jpeg = _pillow_encode(np.zeros((height, width, 3), np.uint8), "jpeg", quality)
    return jpeg[:_scan_start(jpeg)]


def encode(pixels: np.ndarray, codec: str, quality: int) -> bytes:
    """The bytes the link carries for an image at `quality`."""
    data = _pillow_encode(pixels, codec, quality)
    if codec == "jpeg":
        start = _scan_start(data)
        if data[:start] != _jpeg_header(quality, *pixels.shape[:2]):
            raise RuntimeError("the JPEG header changed with the image content: this Pillow "
                               "no longer writes a fixed one, so it cannot be left out")
        return data[start:]
    return data


def decode(data: bytes, codec: str, quality: int, height: int, width: int) -> np.ndarray:
    if codec == "jpeg":
        data = _jpeg_header(quality, height, width) + data
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def all_qualities(pixels: np.ndarray, codec: str) -> list[bytes]:
    """The image's bytes at every quality 1..100 (quality q at index q - 1); a report
    computes them once per image and picks from them at every budget."""
    return [encode(pixels, codec, q) for q in QUALITIES]


def best_fit(encodings: list[bytes], max_bytes: int) -> int | None:
    """The largest quality whose bytes fit in `max_bytes` (sizes are not monotone in
    the quality for WebP and AVIF, so every quality is looked at), or None."""
    fits = [q for q, data in zip(QUALITIES, encodings) if len(data) <= max_bytes]
    return max(fits) if fits else None


@dataclass
class Received:
    images: Tensor  # [B, 3, H, W] in [0, 1]: decoded, or the fallback
    lost: Tensor  # bool [B]: the block failed its CRC (or did not decode)
    unsent: Tensor  # bool [B]: not even quality 1 fit the budget
    quality: Tensor  # int [B]: the quality sent (0: unsent)
    payload_bytes: Tensor  # int [B]: the codec's bytes sent
    mcs: list[phy.Mcs]  # per image: the row its block went at


def transmit_images(images: Tensor, budgets: list[int], channel: WirelessChannel,
                    snr_db: float, codec: str, mcs: str | int, fallback: Tensor,
                    generator: torch.Generator | None = None,
                    encodings: list[list[bytes]] | None = None) -> Received:
    """Send each image [B, 3, H, W] (in [0, 1]) within its budget of channel uses.
    `encodings`: all_qualities of each image, if the caller has them already."""
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} unknown: use one of {', '.join(CODECS)}")
    b, _, h, w = images.shape
    out = fallback.detach().cpu().expand(b, -1, -1, -1).clone()
    lost = torch.zeros(b, dtype=torch.bool)
    unsent = torch.zeros(b, dtype=torch.bool)
    quality = torch.zeros(b, dtype=torch.int64)
    sent_bytes = torch.zeros(b, dtype=torch.int64)
    rows: list[phy.Mcs] = []
    for i in range(b):
        versions = (encodings[i] if encodings is not None
                    else all_qualities(to_uint8(images[i]), codec))
        row = _row(mcs, snr_db, budgets[i])
        rows.append(row)
        room = phy.capacity_bits(budgets[i], row) // 8 - HEADER_BYTES
        q = best_fit(versions, room)
        if q is None:
            unsent[i] = True
            continue
        data = versions[q - 1]
        quality[i], sent_bytes[i] = q, len(data)
        block = bytes([q]) + len(data).to_bytes(2, "big") + data
        bits, ok, _ = phy.transmit(phy.bytes_to_bits(block)[None], row, channel, snr_db, generator)
        if not ok[0]:
            lost[i] = True
            continue
        got = phy.bits_to_bytes(bits[0])
        try:  # a passed CRC with a wrong block is rare (2^-24) but must not crash the run
            pixels = decode(got[HEADER_BYTES:HEADER_BYTES + int.from_bytes(got[1:3], "big")],
                            codec, got[0], h, w)
            out[i] = from_uint8(pixels)
        except (OSError, ValueError, SyntaxError):
            lost[i] = True
    return Received(out, lost, unsent, quality, sent_bytes, rows)


def _row(mcs: str | int, snr_db: float, budget: int) -> phy.Mcs:
    """The MCS of a block that fills `budget` channel uses: the link adaptation's for
    the block that fits at the long-block row, or, if that block is short, for it."""
    long_row = phy.select_mcs(mcs, snr_db)
    return phy.select_mcs(mcs, snr_db, phy.capacity_bits(budget, long_row))
