"""The three-phase task-adaptive link (arXiv 2505.07980, Fig. 1 and Sec. III) over
Flower messages.

1. Transmitter: x_seg from its segmentation net, downsampled and run-length coded,
   sent in a `query.diffusion_phase1` Message.
2. Receiver: decodes x_seg from that message alone, samples x_hat_1 ~ p(x | x_seg,
   x_att = 0) by DDIM and asks for what it needs (the main object class of the map it
   received; feedback.receiver_request) in a `query.diffusion_feedback` Message: the
   class (one byte) or, with `diffusion.feedback: text`, a prompt such as "a red
   circle" (UTF-8; feedback.py).
3. Transmitter: the attention A for the feedback, Grad-CAM of its classifier for the
   requested class ("cam") or of a local CLIP for the prompt ("clip",
   clip_attention.py); M_A = 1[A > tau], x_att = M_A * x_edge; only the non-zero
   patches and their locations are sent (`query.diffusion_phase3`).
4. Receiver: decodes x_att from that message and samples x_hat_3 ~ p(x | x_seg, x_att)
   from the same initial noise.

Every payload travels as bytes in a ConfigRecord of a real Flower `Message`, and the
byte counts are read back from those messages. By default the link between the two
ends is error-free; with a `DigitalLink` the phase-1 and phase-3 payloads each cross
the physical layer as one transport block (models/digital_phy.py: 5G LDPC, CRC24A,
QAM, over any channel model) and a failed CRC is an erasure the receiver knows about:
a lost phase-1 map leaves the receiver an all-background map (it then asks for
nothing it could see), a lost phase-3 block leaves x_att = 0 (the phase-1 image
stands). The one-byte feedback goes on a reliable control channel. Transmitter and receiver both run on
the client (the link is evaluated where the private nets live); `mode` gives the
attention ("cam", "clip") or the paper's baselines: "all" (all edges, no attention),
"none" (seg only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor

from common.config import ChannelConfig, ExperimentConfig
from models.channel import WirelessChannel
from models.diffusion import codec, feedback
from models.diffusion.classes import MaskClasses, mask_classes
from models.diffusion.clip_attention import clip_attention, load_clip
from models.diffusion.config import DiffusionConfig
from models.diffusion.ddpm import conditions, ddim_sample, one_step_decode
from models.diffusion.model import DiffusionSemCom
from models.digital_phy import bits_to_bytes, bytes_to_bits, select_mcs, transmit

TRANSMITTER, RECEIVER = 1, 2  # node ids of the two ends inside one client
PAYLOAD = "payload"
PHASE1, FEEDBACK, PHASE3 = "query.diffusion_phase1", "query.diffusion_feedback", "query.diffusion_phase3"
MODES = ("cam", "clip", "all", "none")


def link_message(kind: str, payload: bytes, src: int, dst: int) -> Message:
    """A Flower Message carrying one payload as bytes. Built from explicit metadata:
    the link runs inside a ClientApp call (or a report), not as a task of its own."""
    meta = Metadata(run_id=0, message_id="", src_node_id=src, dst_node_id=dst,
                    reply_to_message_id="", group_id="", created_at=time.time(), ttl=60.0,
                    message_type=kind)
    return Message(metadata=meta, content=RecordDict({kind: ConfigRecord({PAYLOAD: payload})}))


def message_payload(msg: Message) -> bytes:
    """The payload of a link message: what the receiving end decodes, and what is counted."""
    return msg.content.config_records[msg.metadata.message_type][PAYLOAD]


def message_bytes(messages: list[Message]) -> int:
    return sum(len(message_payload(m)) for m in messages)


@dataclass
class DigitalLink:
    """The payloads over the physical layer: `channel` (a channel.model name) at
    `snr_db`, the MCS `mcs` ("auto": per SNR and block length, or a row of
    models.digital_phy.MCS_TABLE)."""

    channel: str
    snr_db: float
    mcs: str | int = "auto"
    generator: torch.Generator | None = None

    def send(self, payload: bytes) -> tuple[bytes | None, int]:
        """The payload as received (None: its block failed the CRC) and the channel
        uses it took."""
        bits = bytes_to_bits(payload)[None]
        row = select_mcs(self.mcs, self.snr_db, bits.shape[1])
        link = WirelessChannel(ChannelConfig(model=self.channel, snr_db=self.snr_db))
        out, ok, uses = transmit(bits, row, link, self.snr_db, self.generator)
        return (bits_to_bytes(out[0]) if bool(ok[0]) else None), uses


def _over(link: DigitalLink | None, messages: list[Message]) -> tuple[list[bytes | None], Tensor]:
    """What the receiver gets of each message's payload, and the channel uses [B]."""
    if link is None:
        return [message_payload(m) for m in messages], torch.zeros(len(messages))
    sent = [link.send(message_payload(m)) for m in messages]
    return [got for got, _ in sent], torch.tensor([float(uses) for _, uses in sent])


@dataclass
class LinkResult:
    seg_small: Tensor  # [B, s, s]: x_seg as decoded by the receiver
    requested: Tensor  # [B]: the class the receiver asked for (what its tasks score)
    x_att: Tensor  # [B, S, S]: x_att as decoded by the receiver
    recon1: Tensor  # [B, 3, S, S] phase-1 reconstruction
    recon3: Tensor  # [B, 3, S, S] phase-3 reconstruction
    messages: dict[str, list[Message]] = field(default_factory=dict)
    prompts: list[str] | None = None  # the prompts CLIP attended to (mode "clip")
    # Over a DigitalLink: the blocks that failed their CRC and the channel uses per image
    # (phases 1 and 3); all False / 0 over the error-free link.
    lost: dict[str, Tensor] = field(default_factory=dict)
    channel_uses: Tensor | None = None

    def nbytes(self, kind: str) -> int:
        return message_bytes(self.messages.get(kind, []))

    def patches(self) -> int:
        return sum(codec.patch_count(message_payload(m)) for m in self.messages.get(PHASE3, []))


def cam_attention(classifier: torch.nn.Module, image: Tensor, requested: Tensor) -> Tensor:
    """A for the requested classes: Grad-CAM of the transmitter's classifier on its
    `cam_layer`, at the image size, min-max normalised per image by pytorch-grad-cam
    ([B, S, S] in [0, 1])."""
    classifier.eval()
    with torch.enable_grad(), GradCAM(model=classifier, target_layers=[classifier.cam_layer]) as cam:
        maps = cam(input_tensor=image, targets=[ClassifierOutputTarget(int(c)) for c in requested])
    return torch.from_numpy(np.ascontiguousarray(maps)).float().to(image.device)


def _decode(model: DiffusionSemCom, cond: Tensor, cfg: ExperimentConfig, seed: int,
            decoder: torch.nn.Module | None) -> Tensor:
    if decoder is not None:
        with torch.no_grad():
            return one_step_decode(decoder, cond)
    return ddim_sample(model.unet, cond, cfg, seed)


class Phase1(NamedTuple):
    """Phases 1 and 2 at the receiver: what it decoded, its reconstruction, the
    messages, and the class it asked for (it knows its own request; the transmitter
    reads only the feedback messages)."""
    seg_small: Tensor  # [B, s, s]
    recon1: Tensor  # [B, 3, S, S]
    messages: list[Message]  # phase 1
    feedback: list[Message]
    requested: Tensor  # [B]
    lost: Tensor | None = None  # bool [B]: the phase-1 block failed its CRC
    channel_uses: Tensor | None = None  # [B]


def transmitter_attention(model: DiffusionSemCom, image: Tensor, fb: list[Message],
                          dc: DiffusionConfig, mode: str, classes: MaskClasses
                          ) -> tuple[Tensor, list[str] | None]:
    """A [B, S, S] in [0, 1] for the feedback messages, decoded from their bytes alone
    as `diffusion.feedback` says they are written (`classes`: the source's); and the
    prompts CLIP attended to."""
    payloads = [message_payload(m) for m in fb]
    if dc.feedback == "text":
        if mode == "cam":
            raise ValueError("mode 'cam' needs class feedback (Grad-CAM scores a class); "
                             "free text needs mode 'clip'")
        texts = [feedback.decode_text(p) for p in payloads]
    else:
        asked = [feedback.decode_class(p, classes.objects) for p in payloads]
        if mode == "cam":
            return cam_attention(model.classifier, image, torch.tensor(asked)), None
        texts = [feedback.prompt(c, names=classes.names) for c in asked]  # CLIP's prompt
    return clip_attention(load_clip(dc.clip_checkpoint), image, texts), texts


@torch.no_grad()
def three_phase_link(model: DiffusionSemCom, image: Tensor, cfg: ExperimentConfig, tau: float,
                     mode: str = "cam", seed: int = 0, decoder: torch.nn.Module | None = None,
                     phase1: Phase1 | None = None, link: DigitalLink | None = None) -> LinkResult:
    """Run the link on a batch of images; `decoder` replaces the DDPM by the one-step
    decoder; `phase1` reuses phases 1-2 of an earlier call (the tau sweep shares them);
    `link`: the payloads over the physical layer (None: error-free)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {list(MODES)}")
    model.eval()
    if phase1 is None:
        phase1 = run_phase1(model, image, cfg, seed, decoder, link)
    edges = codec.edge_map(image, cfg.diffusion.edge_threshold)
    prompts = None
    if mode in ("cam", "clip"):
        # Transmitter: the feedback message tells it what to attend to.
        attention, prompts = transmitter_attention(model, image, phase1.feedback, cfg.diffusion,
                                                   mode, mask_classes(cfg.data))
        x_att_tx = codec.attention_mask(attention, tau) * edges
    elif mode == "all":
        x_att_tx = edges
    else:
        x_att_tx = torch.zeros_like(edges)
    return run_phase3(model, x_att_tx, phase1, cfg, seed, decoder, prompts, link)


@torch.no_grad()
def run_phase3(model: DiffusionSemCom, x_att_tx: Tensor, phase1: Phase1, cfg: ExperimentConfig,
               seed: int = 0, decoder: torch.nn.Module | None = None,
               prompts: list[str] | None = None, link: DigitalLink | None = None) -> LinkResult:
    """Phases 3-4 for the transmitter's x_att [B, S, S]: its non-zero patches over the
    link, and the receiver's reconstruction from x_seg and the x_att it decodes from
    those messages alone (zero where a block was lost)."""
    dc, size = cfg.diffusion, x_att_tx.shape[-1]
    msgs3 = [link_message(PHASE3, codec.encode_edge_patches(x.cpu().numpy(), dc.edge_patch),
                          TRANSMITTER, RECEIVER) for x in x_att_tx]
    got, uses3 = _over(link, msgs3)
    x_att = torch.stack([torch.zeros(size, size) if p is None else torch.from_numpy(
        codec.decode_edge_patches(p, size, dc.edge_patch)) for p in got]).to(x_att_tx.device)
    seg_full = codec.upsample_classes(phase1.seg_small, size)
    recon3 = _decode(model, conditions(seg_full, x_att, mask_classes(cfg.data).count), cfg,
                     seed, decoder)
    lost1 = phase1.lost if phase1.lost is not None else torch.zeros(len(got), dtype=torch.bool)
    uses1 = phase1.channel_uses if phase1.channel_uses is not None else torch.zeros(len(got))
    return LinkResult(phase1.seg_small, phase1.requested, x_att, phase1.recon1, recon3,
                      {PHASE1: phase1.messages, FEEDBACK: phase1.feedback, PHASE3: msgs3},
                      prompts, {PHASE1: lost1, PHASE3: torch.tensor([p is None for p in got])},
                      uses1 + uses3)


def feedback_messages(model: DiffusionSemCom, recon1: Tensor, seg_small: Tensor, kind: str,
                      classes: MaskClasses) -> tuple[list[Message], Tensor]:
    """Phase 2 at the receiver: it decides what it needs (feedback.receiver_request) and
    says so as a class byte ("class") or a prompt ("text") per image."""
    requested, texts = feedback.receiver_request(model, recon1, seg_small, classes)
    payloads = ([feedback.encode_class(int(c), classes.objects) for c in requested]
                if kind == "class" else [feedback.encode_text(t) for t in texts])
    return [link_message(FEEDBACK, p, RECEIVER, TRANSMITTER) for p in payloads], requested


def with_feedback(model: DiffusionSemCom, phase1: Phase1, kind: str,
                  classes: MaskClasses) -> Phase1:
    """The same phase 1 with the other kind of feedback (the report compares them)."""
    fb, requested = feedback_messages(model, phase1.recon1, phase1.seg_small, kind, classes)
    return phase1._replace(feedback=fb, requested=requested)


@torch.no_grad()
def run_phase1(model: DiffusionSemCom, image: Tensor, cfg: ExperimentConfig, seed: int,
               decoder: torch.nn.Module | None = None, link: DigitalLink | None = None) -> Phase1:
    """Phases 1 and 2: x_seg over the link (all background where its block was lost),
    the receiver's reconstruction and feedback (of the kind `diffusion.feedback` names)."""
    dc, size, classes = cfg.diffusion, image.shape[-1], mask_classes(cfg.data)
    side, n = size // dc.seg_downsample, classes.count
    model.eval()
    seg_tx = codec.downsample_classes(model.seg_net(image).argmax(1), dc.seg_downsample, n)
    msgs1 = [link_message(PHASE1, codec.encode_class_map(s.cpu().numpy(), n), TRANSMITTER,
                          RECEIVER) for s in seg_tx]
    got, uses = _over(link, msgs1)
    seg_small = torch.stack([torch.zeros(side, side, dtype=torch.int64) if p is None else
                             torch.from_numpy(codec.decode_class_map(p, side, n))
                             for p in got]).to(image.device)
    cond = conditions(codec.upsample_classes(seg_small, size), torch.zeros(
        seg_small.shape[0], size, size, device=image.device), n)
    recon1 = _decode(model, cond, cfg, seed, decoder)
    fb, requested = feedback_messages(model, recon1, seg_small, dc.feedback, classes)
    return Phase1(seg_small, recon1, msgs1, fb, requested,
                  torch.tensor([p is None for p in got]), uses)
