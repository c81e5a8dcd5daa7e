"""TACO's transmitter and receiver (Sec. III-A), for one image at a time.

Transmitter: z = Q(E(x)), z_c = Q(E(S_4(x))), GradCAM of the task model on x pooled to
the latent grid, M = its top p% positions, z_i = z at M. Local semantic feedback (LSF):
it simulates the receiver at every candidate p, smallest first, and sends the first
whose task result is compatible with the result on x (`taco.lsf_rule`).

Receiver (Eq. 7): z_u = Q(E(U_4(D(z_c)))), z_r = (1 - M) * z_u + M * z_i, x_hat = D(z_r).
Context indices whose block M covers fully are not sent (LSF, Eqs. 6-8); the receiver
puts index 0 there. D's receptive field spreads that filler a little into the
neighbouring positions of z_u, and the transmitter's simulation fills the same way, so
both sides compute the same x_hat bit for bit. Every pass here runs on a batch of one,
on both sides, so that no batch-size-dependent kernel choice can tell them apart.

Task switching (Sec. IV-C): the receiver segments x_hat for a requested class, asks
for the latent positions it needs, and the transmitter answers with the indices of
the requested positions it has not sent before (on a source with segmentation masks:
models/taco/task.py switch_mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from flwr.app import Message
from torch import Tensor

from models.taco.codec import DOWNSAMPLE, VQCodec, downsample, upsample
from models.taco.payload import (
    Payload,
    covered_context,
    deserialise,
    message_payload,
    payload_message,
    serialise,
)
from models.taco.task import Segmenter, TaskClassifier, segment, top_mask


def fuse(z_u: Tensor, mask: Tensor, task_indices: Tensor) -> Tensor:
    """TACO Eq. 7 on indices: z_r = (1 - M) * z_u + M * z_i."""
    z_r = z_u.clone()
    z_r[mask] = task_indices
    return z_r


class Receiver:
    """The receiver's side of one image: decodes payloads, remembers what it holds."""

    def __init__(self, codec: VQCodec, grid: tuple[int, int]):
        self.codec, self.grid = codec, grid
        self.held: Tensor | None = None  # z_r so far [H, W]
        self.sent: Tensor | None = None  # positions received as task indices [H, W]
        self._z_u: dict[bytes, Tensor] = {}

    @torch.no_grad()
    def context_latents(self, covered: Tensor, context_indices: Tensor) -> Tensor:
        """z_u = Q(E(U_4(D(z_c)))) [H, W]; z_c holds 0 where its block is not sent."""
        key = covered.numpy().tobytes() + context_indices.numpy().tobytes()
        if key not in self._z_u:
            z_c = torch.zeros(covered.shape, dtype=torch.int64)
            z_c[~covered] = context_indices
            context_image = self.codec.decode(z_c[None])
            self._z_u[key] = self.codec.nearest(self.codec.encode(upsample(context_image)))[0]
        return self._z_u[key]

    @torch.no_grad()
    def receive(self, payload: Payload) -> Tensor:
        """x_hat [1, 3, S, S] of a first payload (context + task indices)."""
        if payload.context_indices is None:
            raise ValueError("a first payload carries context indices")
        z_u = self.context_latents(covered_context(payload.mask), payload.context_indices)
        self.held = fuse(z_u, payload.mask, payload.task_indices)
        self.sent = payload.mask.clone()
        return self.codec.decode(self.held[None])

    @torch.no_grad()
    def receive_more(self, payload: Payload) -> Tensor:
        """x_hat after a task-switch reply: its indices replace z_u where it has them."""
        if self.held is None or self.sent is None:
            raise ValueError("receive a first payload before a task-switch reply")
        if bool((payload.mask & self.sent).any()):
            raise ValueError("the reply repeats latent positions already received")
        self.held = fuse(self.held, payload.mask, payload.task_indices)
        self.sent = self.sent | payload.mask
        return self.codec.decode(self.held[None])

    def receive_message(self, message: Message, codebook_size: int) -> Tensor:
        """Decode only from the message's content."""
        payload = deserialise(message_payload(message), self.grid, codebook_size)
        if payload.context_indices is None:
            return self.receive_more(payload)
        return self.receive(payload)


@dataclass
class Transmission:
    message: Message  # the Flower message that carries the payload
    payload: Payload
    image: Tensor  # the receiver's x_hat as the transmitter simulated it [1, 3, S, S]
    logits: Tensor  # the task model on it [1, classes]
    z: Tensor  # the transmitter's full latent z [H, W] (kept for task switching)


def compatible(logits: Tensor, reference: Tensor, rule: str, tolerance: float) -> bool:
    """LSF's test: is the task result on x_hat compatible with the one on x?"""
    c = int(reference.argmax())
    if int(logits.argmax()) != c:
        return False
    if rule == "top1":
        return True
    if rule == "confidence":
        return float(logits.softmax(-1)[0, c]) >= float(reference.softmax(-1)[0, c]) - tolerance
    raise ValueError(f"taco.lsf_rule={rule!r} unknown: use 'top1' or 'confidence'")


class Transmitter:
    """The transmitter's side of one image x [1, 3, S, S] with GradCAM scores [H, W]."""

    def __init__(self, codec: VQCodec, classifier: TaskClassifier, x: Tensor, scores: Tensor,
                 codebook_size: int):
        self.codec, self.classifier, self.scores = codec, classifier, scores
        self.codebook_size = codebook_size
        with torch.no_grad():
            self.z = codec.indices(x)[0]
            self.z_c = codec.indices(downsample(x))[0]
            self.reference = classifier(x)
        self.grid = tuple(self.z.shape)
        self.simulated = Receiver(codec, self.grid)  # LSF's local copy of the receiver

    def payload(self, mask: Tensor, rate: int) -> Payload:
        covered = covered_context(mask)
        return Payload(rate, mask, self.z[mask], self.z_c[~covered])

    @torch.no_grad()
    def send(self, mask: Tensor, rate: int) -> Transmission:
        """Build the payload of a mask, simulate the receiver, wrap it in a message."""
        payload = self.payload(mask, rate)
        image = self.simulated.receive(payload)
        message = payload_message(serialise(payload, self.codebook_size))
        return Transmission(message, payload, image, self.classifier(image), self.z)

    def at_rate(self, rate: int) -> Transmission:
        """Fixed p (no LSF): the GradCAM top-p% mask."""
        return self.send(top_mask(self.scores, rate), rate)

    def lsf(self, rates: list[int], rule: str, tolerance: float,
            fallback: str = "smallest") -> Transmission:
        """LSF: the smallest p whose simulated receiver result is compatible with the
        result on x; when none is, the smallest p (`fallback="smallest"`: no rate
        reproduces the result, so more indices buy nothing for the task) or the largest."""
        tried = []
        for rate in rates:
            tried.append(self.at_rate(rate))
            if compatible(tried[-1].logits, self.reference, rule, tolerance):
                return tried[-1]
        return tried[0] if fallback == "smallest" else tried[-1]

    def answer_request(self, requested: Tensor, already_sent: Tensor) -> Message:
        """A task-switch reply: the indices of the requested positions not sent before."""
        new = requested & ~already_sent
        rate = round(100 * int(new.sum()) / new.numel())
        payload = Payload(rate, new, self.z[new], None)
        return payload_message(serialise(payload, self.codebook_size))


@torch.no_grad()
def switch_request(segmenter: Segmenter, x_hat: Tensor, requested_class: int,
                   confidence: float, foreground: bool = False) -> Tensor:
    """The receiver's request for a new task: the latent positions [H, W] of pixels the
    segmenter gives to `requested_class` (with `foreground`: to any non-background
    class, models/taco/task.py switch_mode) or is less than `confidence` sure of,
    widened by one position (the object's border lives in the next block)."""
    probs = segmenter(x_hat).softmax(1)[0]
    top, label = probs.max(0)
    pixels = (segment(label, requested_class, foreground) | (top < confidence)).float()
    cells = F.max_pool2d(pixels[None, None], DOWNSAMPLE)
    return F.max_pool2d(cells, 3, stride=1, padding=1)[0, 0].bool()
