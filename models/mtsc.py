"""The `mtsc` workload: LAM-based multi-task semantic communication (LAM-MTSC, Fig. 2).

    image -> patch encoder --+
    question -> embedding ---+-> LAM encoder (BART, LoRA) -> importance-aware JSCC encoder
        -> wireless channel
        -> JSCC decoder -> LAM decoder (BART, LoRA, one learned query per task output)
        -> task decoders: classification, VQA answer, caption generation, reconstruction

`Transmitter` is the client half and `Receiver` the server half of the U-shaped split;
`TaskDecoders` hold the labels' side and never leave the client. The LAM is a BART
encoder-decoder built from a config (random init, the same seed on every party, which
stands in for shared pre-trained weights) or loaded from a local checkpoint folder; its
base weights are frozen and peft LoRA adapters on the attention projections are the
only tensors that leave a client (`shared_state`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.functional.text import bleu_score
from transformers import BartConfig, BartModel

from models.channel import WirelessChannel
from models.jscc import (
    JSCCDecoder,
    JSCCEncoder,
    JSCCOutput,
    prefix_mask,
    sent_positions,
)
from simulation.config import ExperimentConfig
from simulation.data import (
    ANSWERS,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    QUESTION_LEN,
    VOCAB,
    decode_tokens,
    num_classes,
)

log = logging.getLogger("fedsemcom")

# Decoder query layout: one query per scalar task, one per reconstructed image patch.
Q_CLS, Q_VQA, Q_CAP, Q_REC = 0, 1, 2, 3


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block under a fixed torch seed without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- LAM


def build_lam(cfg: ExperimentConfig) -> BartModel:
    m = cfg.model
    if m.checkpoint is not None:
        path = Path(m.checkpoint).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.checkpoint={m.checkpoint!r}: no config.json there. Point it at a "
                "local folder saved with BartModel.save_pretrained(), or set it to null "
                "to build the LAM from the config."
            )
        return BartModel.from_pretrained(path, local_files_only=True)
    n_patches = (cfg.data.image_size // m.patch_size) ** 2
    bart_cfg = BartConfig(
        vocab_size=len(VOCAB),
        d_model=m.d_model,
        encoder_layers=m.layers,
        decoder_layers=m.layers,
        encoder_attention_heads=m.heads,
        decoder_attention_heads=m.heads,
        encoder_ffn_dim=m.ffn_dim,
        decoder_ffn_dim=m.ffn_dim,
        max_position_embeddings=max(64, n_patches + QUESTION_LEN + 8),
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        # Unit-gain init (std 1/sqrt(d)) so the frozen random LAM passes signal through,
        # as a pre-trained one does; BART's default 0.02 all but mutes cross-attention.
        init_std=m.d_model ** -0.5,
    )
    with seeded(cfg.seed):
        return BartModel(bart_cfg)


# ----------------------------------------------------------------------------- halves


class PatchEncoder(nn.Module):
    """Image -> one token per patch: a small CNN (conv-ReLU-maxpool blocks, as the
    paper's CNN image encoder) down to the token grid, plus learned positions. Max
    pooling keeps small shapes' evidence that a strided projection averages away."""

    def __init__(self, d_model: int, patch: int, n_patches: int):
        super().__init__()
        layers: list[nn.Module] = []
        ch, stride = 3, 1
        while stride < patch:
            out = d_model if stride * 2 == patch else 32 * stride
            layers += [nn.Conv2d(ch, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            ch, stride = out, stride * 2
        layers.append(nn.Conv2d(ch, d_model, 1))
        self.stem = nn.Sequential(*layers)
        self.pos = nn.Parameter(torch.randn(n_patches, d_model) * 0.02)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, image: Tensor) -> Tensor:
        x = self.stem(image).flatten(2).transpose(1, 2)  # [B, N, D]
        return self.norm(x + self.pos)


class Transmitter(nn.Module):
    """Client half: modality encoders -> LAM encoder (LoRA) -> JSCC encoder."""

    def __init__(self, cfg: ExperimentConfig, lam_encoder: nn.Module, d_model: int):
        super().__init__()
        n_patches = (cfg.data.image_size // cfg.model.patch_size) ** 2
        self.image_encoder = PatchEncoder(d_model, cfg.model.patch_size, n_patches)
        self.text_embedding = nn.Embedding(len(VOCAB), d_model, padding_idx=PAD_ID)
        self.modality = nn.Embedding(2, d_model)  # 0 = image token, 1 = text token
        self.lam_encoder = lam_encoder
        self.jscc_encoder = JSCCEncoder(
            d_model, cfg.model.jscc_symbols, cfg.model.min_rate, cfg.model.rate_snr_db
        )

    def forward(self, image: Tensor, question: Tensor | None, snr_db: Tensor) -> JSCCOutput:
        tokens = self.image_encoder(image) + self.modality.weight[0]
        keep = torch.ones(tokens.shape[:2], dtype=torch.long, device=image.device)
        if question is not None:
            text = self.text_embedding(question) + self.modality.weight[1]
            tokens = torch.cat([tokens, text], dim=1)
            keep = torch.cat([keep, (question != PAD_ID).long()], dim=1)
        h = self.lam_encoder(inputs_embeds=tokens, attention_mask=keep).last_hidden_state
        return self.jscc_encoder(h, snr_db)


class Receiver(nn.Module):
    """Server half: JSCC decoder -> LAM decoder (LoRA) driven by learned task queries."""

    def __init__(self, cfg: ExperimentConfig, lam_decoder: nn.Module, d_model: int):
        super().__init__()
        n_patches = (cfg.data.image_size // cfg.model.patch_size) ** 2
        self.jscc_decoder = JSCCDecoder(d_model, cfg.model.jscc_symbols)
        self.lam_decoder = lam_decoder
        self.task_queries = nn.Parameter(torch.randn(Q_REC + n_patches, d_model) * 0.02)

    def forward(self, received: Tensor, mask: Tensor, snr_db: Tensor) -> Tensor:
        memory = self.jscc_decoder(received, mask, snr_db)
        queries = self.task_queries.unsqueeze(0).expand(received.shape[0], -1, -1)
        n_rec = queries.shape[1] - Q_REC
        # Reconstruction positions start from the received image tokens themselves (plus
        # a learned per-patch query): the patch content rides the residual stream
        # instead of having to be found again by cross-attention.
        queries = torch.cat([queries[:, :Q_REC], queries[:, Q_REC:] + memory[:, :n_rec]], dim=1)
        out = self.lam_decoder(inputs_embeds=queries, encoder_hidden_states=memory)
        return out.last_hidden_state  # [B, Q, D]


class CaptionDecoder(nn.Module):
    """A GRU language model conditioned on the caption query's state (teacher forcing)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), d_model, padding_idx=PAD_ID)
        self.init = nn.Linear(d_model, d_model)
        self.gru = nn.GRU(2 * d_model, d_model, batch_first=True)
        self.out = nn.Linear(d_model, len(VOCAB))

    def forward(self, context: Tensor, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        ctx = context.unsqueeze(1).expand(-1, x.shape[1], -1)
        h0 = torch.tanh(self.init(context)).unsqueeze(0)
        y, _ = self.gru(torch.cat([x, ctx], dim=-1), h0)
        return self.out(y)

    @torch.no_grad()
    def generate(self, context: Tensor, max_len: int) -> Tensor:
        b = context.shape[0]
        tok = torch.full((b, 1), BOS_ID, dtype=torch.long, device=context.device)
        h = torch.tanh(self.init(context)).unsqueeze(0)
        out = [tok]
        for _ in range(max_len - 1):
            x = torch.cat([self.embed(tok), context.unsqueeze(1)], dim=-1)
            y, h = self.gru(x, h)
            tok = self.out(y).argmax(-1)
            out.append(tok)
        return torch.cat(out, dim=1)


class TaskDecoders(nn.Module):
    """Client-private heads; they see labels and never leave the client."""

    def __init__(self, cfg: ExperimentConfig, d_model: int):
        super().__init__()
        p = cfg.model.patch_size
        self.tasks = list(cfg.model.tasks)
        self.patch, self.side = p, cfg.data.image_size // p
        self.classification = nn.Linear(d_model, num_classes(cfg.data))
        self.vqa = nn.Linear(d_model, len(ANSWERS))
        self.captioning = CaptionDecoder(d_model)
        self.reconstruction = nn.Sequential(
            nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, 3 * p * p)
        )

    def reconstruct(self, h: Tensor) -> Tensor:
        b, p, s = h.shape[0], self.patch, self.side
        # Linear output (no sigmoid: on dark images it saturates and stops learning).
        patches = self.reconstruction(h[:, Q_REC:])  # [B, s*s, 3*p*p]
        img = patches.reshape(b, s, s, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return img.reshape(b, 3, s * p, s * p)

    def losses(self, h: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "classification" in self.tasks:
            out["classification"] = F.cross_entropy(self.classification(h[:, Q_CLS]), batch["label"])
        if "vqa" in self.tasks:
            out["vqa"] = F.cross_entropy(self.vqa(h[:, Q_VQA]), batch["answer"])
        if "captioning" in self.tasks:
            cap = batch["caption"]
            logits = self.captioning(h[:, Q_CAP], cap[:, :-1])
            out["captioning"] = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), cap[:, 1:].reshape(-1), ignore_index=PAD_ID
            )
        if "reconstruction" in self.tasks:
            out["reconstruction"] = F.mse_loss(self.reconstruct(h), batch["image"])
        return out


class MTSCModel(nn.Module):
    def __init__(self, cfg: ExperimentConfig, lam: BartModel):
        super().__init__()
        d = lam.config.d_model
        self.cfg = cfg
        self.transmitter = Transmitter(cfg, lam.encoder, d)
        self.channel = WirelessChannel(cfg.channel)
        self.receiver = Receiver(cfg, lam.decoder, d)
        self.task_decoders = TaskDecoders(cfg, d)

    def uplink(self, batch: dict[str, Tensor], snr_db: Tensor | None = None,
               generator: torch.Generator | None = None
               ) -> tuple[JSCCOutput, Tensor, Tensor]:
        """Client half and channel: (what the JSCC sent, what arrives, the SNR)."""
        image = batch["image"]
        if snr_db is None:
            snr_db = self.channel.sample_snr_db(image.shape[0], image.device, generator)
        question = batch.get("question") if "vqa" in self.cfg.model.tasks else None
        tx = self.transmitter(image, question, snr_db)
        received = self.channel(tx.symbols, snr_db, generator)
        # Only what was sent arrives: the receiver sees no noise where the JSCC sent
        # nothing (so the mask's gradient there is 0, as in the split over the wire).
        received = torch.where(sent_positions(tx.counts, received.shape[-1]), received, 0)
        return tx, received, snr_db

    def forward(self, batch: dict[str, Tensor], snr_db: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, JSCCOutput]:
        tx, received, snr_db = self.uplink(batch, snr_db, generator)
        return self.receiver(received, tx.mask, snr_db), tx


# ----------------------------------------------------------------------------- the seam


def build(cfg: ExperimentConfig, device: torch.device | str = "cpu",
          lora_rank: int | None = None) -> MTSCModel:
    """The whole model: frozen LAM base + LoRA (shared seed) + private modules."""
    lam = build_lam(cfg)
    lora = LoraConfig(
        r=lora_rank or cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
    )
    with seeded(cfg.lora.init_seed):  # every client starts from the same A matrices
        inject_adapter_in_model(lora, lam.encoder)
        inject_adapter_in_model(lora, lam.decoder)
    with seeded(cfg.seed + 1):
        model = MTSCModel(cfg, lam)
    for name, p in model.named_parameters():
        if "lam_" in name and "lora_" not in name:
            p.requires_grad_(False)  # the LAM's base weights stay frozen
    return model.to(device)


def _lora_modules(model: MTSCModel) -> dict[str, nn.Module]:
    return {"encoder": model.transmitter.lam_encoder, "decoder": model.receiver.lam_decoder}


def shared_state(model: MTSCModel, lora_train: str = "ab",
                 client_half_only: bool = False) -> dict[str, np.ndarray]:
    """The only tensors that may leave a client: LoRA adapters (only B for FFA-LoRA).
    In split training the client holds only the encoder's (`client_half_only`)."""
    out = {}
    for prefix, module in _lora_modules(model).items():
        if client_half_only and prefix != "encoder":
            continue
        for key, value in get_peft_model_state_dict(module).items():
            if lora_train == "b" and "lora_A" in key:
                continue
            out[f"{prefix}.{key}"] = value.detach().cpu().float().numpy()
    return out


def _fit_rank(a: Tensor, b: Tensor, local_a: Tensor) -> tuple[Tensor, Tensor]:
    """Map rank-R factors (SVD-ordered, scaling alpha/R) onto a local rank r.

    (alpha/r) B_r A_r = (alpha/R) B[:, :r] A[:r] needs both factors scaled by sqrt(r/R).
    Components that carry nothing (zero B column; for r > R the extra ones, or the
    zero padding svd_lora adds when the update has fewer than R components) get the
    local A row back: the product is unchanged and they can still learn, which an
    all-zero pair never would (both gradients vanish).
    """
    big_r, r = a.shape[0], local_a.shape[0]
    c = math.sqrt(r / big_r)
    if big_r >= r:
        a_fit, b_fit = a[:r] * c, b[:, :r] * c
    else:
        a_fit = torch.cat([a * c, torch.zeros(r - big_r, a.shape[1])], dim=0)
        b_fit = torch.cat([b * c, torch.zeros(b.shape[0], r - big_r)], dim=1)
    dead = (b_fit.abs().sum(dim=0) == 0) & (a_fit.abs().sum(dim=1) == 0)
    a_fit[dead] = local_a[dead].to(a_fit.dtype)
    return a_fit, b_fit


def load_shared_state(model: MTSCModel, arrays: dict[str, np.ndarray]) -> None:
    """Load adapters from the server; adapts the rank when it differs (svd_lora)."""
    params = dict(model.named_parameters())
    names = {}
    for prefix, module in _lora_modules(model).items():
        owner = "transmitter.lam_encoder" if prefix == "encoder" else "receiver.lam_decoder"
        for key in get_peft_model_state_dict(module):
            local = key.replace(".weight", ".default.weight")
            names[f"{prefix}.{key}"] = params[f"{owner}.{local}"]
    unexpected = sorted(set(arrays) - set(names))
    if unexpected:
        raise KeyError(f"shared state has keys this model does not: {unexpected[:3]}")
    incoming = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in arrays.items()}
    with torch.no_grad():
        for key, value in incoming.items():
            if "lora_B" in key:
                continue
            b_key = key.replace("lora_A", "lora_B")
            a_local = names[key].detach().cpu()
            b_value = incoming.get(b_key, names[b_key].detach().cpu())
            a_fit, b_fit = _fit_rank(value, b_value, a_local)
            names[key].copy_(a_fit)
            incoming[b_key] = b_fit
        for key, value in incoming.items():
            if "lora_B" in key:
                if value.shape != names[key].shape:
                    raise ValueError(
                        f"{key}: got shape {tuple(value.shape)}, model has "
                        f"{tuple(names[key].shape)}"
                    )
                names[key].copy_(value)


# The U-shaped split (LAM-MTSC, federated split fine-tuning): the client keeps the
# transmitter (modality encoders, LAM encoder + LoRA, JSCC encoder) and the task decoders
# with its labels; the server keeps the receiver (JSCC decoder, LAM decoder + LoRA).
CLIENT_HALF = ("transmitter.", "task_decoders.")


def client_parameters(model: MTSCModel) -> dict[str, nn.Parameter]:
    """Everything the client trains in split mode (the LAM's base weights are frozen)."""
    return {n: p for n, p in model.named_parameters()
            if n.startswith(CLIENT_HALF) and ("lam_" not in n or "lora_" in n)}


def server_half(model: MTSCModel) -> Receiver:
    return model.receiver


def server_forward(receiver: Receiver, received: Tensor, counts: Tensor,
                   snr_db: Tensor) -> Tensor:
    """The server half on what arrived; the prefix mask is rebuilt from the counts, so
    the importance scores' gradient flows back through them."""
    return receiver(received, prefix_mask(counts, received.shape[-1]), snr_db)


def set_trainable(model: MTSCModel, lora_train: str) -> None:
    """FFA-LoRA freezes A; everything private and every B stays trainable."""
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(lora_train == "ab")
        elif "lora_B" in name:
            p.requires_grad_(True)


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.amp` on `device`; None trains in fp32.

    Mixed precision is for CUDA only. One experiment config reaches every node, and
    a federation may mix GPU and CPU nodes, so a CPU node trains in fp32 and says so
    rather than failing the round.
    """
    if amp == "none":
        return None
    if device.type != "cuda":
        log.warning("train.amp=%s needs CUDA; this node trains on %s in fp32", amp, device)
        return None
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"train.amp=bf16 but {torch.cuda.get_device_name(device)} has no "
                           "bf16 support; use train.amp=fp16 or none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def train_local(model: MTSCModel, data: Dataset, cfg: ExperimentConfig,
                lora_train: str = "ab", seed: int = 0) -> dict[str, float]:
    """Local epochs of AdamW on the weighted sum of task losses.

    `seed` fixes the batch order, the per-example SNR draws and the channel noise, so
    a round is reproducible."""
    torch.manual_seed(seed)
    set_trainable(model, lora_train)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
    )
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True, generator=gen)
    weights = cfg.train.loss_weights
    amp_dtype = autocast_dtype(cfg.train.amp, device)
    # fp16 needs loss scaling against underflowing gradients; bf16 has fp32's range.
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    model.train()
    total, per_task, symbols, n_seen = 0.0, {}, 0.0, 0
    for _ in range(cfg.train.local_epochs):
        for batch in loader:
            batch = _to(batch, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                h, tx = model(batch)
                losses = model.task_decoders.losses(h, batch)
                loss = sum(weights.get(t, 1.0) * v for t, v in losses.items())
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            n = batch["image"].shape[0]
            n_seen += n
            total += loss.item() * n
            symbols += tx.symbols_sent.sum().item()
            for t, v in losses.items():
                per_task[t] = per_task.get(t, 0.0) + v.item() * n
    metrics = {"train_loss": total / n_seen, "symbols_per_example": symbols / n_seen}
    metrics.update({f"loss_{t}": v / n_seen for t, v in per_task.items()})
    metrics["num-examples"] = len(data)
    return metrics


class TaskScorer:
    """Task metrics accumulated over batches of receiver outputs `h` and their labels.

    accuracy (classification), vqa_accuracy, bleu (BLEU-4, smoothed, greedy captions),
    psnr (dB, images in [0, 1]) and majority_class_share: the accuracy a constant
    guess of the most common local test label would get, to read accuracy against.
    """

    def __init__(self, cfg: ExperimentConfig):
        self.tasks, self.weights = cfg.model.tasks, cfg.train.loss_weights
        self.n, self.loss, self.correct, self.vqa_correct, self.psnr = 0, 0.0, 0, 0, 0.0
        self.hyps: list[str] = []
        self.refs: list[list[str]] = []
        self.labels: list[Tensor] = []

    def add(self, heads: TaskDecoders, h: Tensor, batch: dict[str, Tensor]) -> None:
        n = batch["image"].shape[0]
        losses = heads.losses(h, batch)
        self.loss += sum(self.weights.get(t, 1.0) * v for t, v in losses.items()).item() * n
        self.n += n
        self.labels.append(batch["label"].cpu())
        if "classification" in self.tasks:
            pred = heads.classification(h[:, Q_CLS]).argmax(-1)
            self.correct += (pred == batch["label"]).sum().item()
        if "vqa" in self.tasks:
            self.vqa_correct += (heads.vqa(h[:, Q_VQA]).argmax(-1) == batch["answer"]).sum().item()
        if "captioning" in self.tasks:
            gen = heads.captioning.generate(h[:, Q_CAP], batch["caption"].shape[1])
            self.hyps += [decode_tokens(g.tolist()) for g in gen]
            self.refs += [[decode_tokens(c.tolist())] for c in batch["caption"]]
        if "reconstruction" in self.tasks:
            rec = heads.reconstruct(h).clamp(0.0, 1.0)
            self.psnr += peak_signal_noise_ratio(rec, batch["image"], data_range=1.0,
                                                 reduction="sum", dim=(1, 2, 3)).item()

    def result(self) -> dict[str, float]:
        counts = torch.bincount(torch.cat(self.labels))
        out = {"loss": self.loss / self.n, "num-examples": self.n,
               "majority_class_share": counts.max().item() / self.n}
        if "classification" in self.tasks:
            out["accuracy"] = self.correct / self.n
        if "vqa" in self.tasks:
            out["vqa_accuracy"] = self.vqa_correct / self.n
        if "captioning" in self.tasks:
            out["bleu"] = float(bleu_score(self.hyps, self.refs, n_gram=4, smooth=True))
        if "reconstruction" in self.tasks:
            out["psnr"] = self.psnr / self.n
        return out


def eval_batches(data: Dataset, cfg: ExperimentConfig) -> DataLoader:
    return DataLoader(data, batch_size=max(64, cfg.train.batch_size))


@torch.no_grad()
def evaluate(model: MTSCModel, data: Dataset, cfg: ExperimentConfig) -> dict[str, float]:
    """Task metrics (see TaskScorer) on the client's local test split."""
    with seeded(cfg.seed):  # the same SNR draws and channel noise at every evaluation
        device = next(model.parameters()).device
        model.eval()
        scorer = TaskScorer(cfg)
        for batch in eval_batches(data, cfg):
            batch = _to(batch, device)
            h, _ = model(batch)
            scorer.add(model.task_decoders, h, batch)
        return scorer.result()
