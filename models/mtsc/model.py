"""The `mtsc` workload: LAM-based multi-task semantic communication (LAM-MTSC, Fig. 2).

    image -> patch encoder --+
    question -> embedding ---+-> LAM encoder (BART, LoRA) -> importance-aware JSCC encoder
        -> wireless channel
        -> JSCC decoder -> LAM decoder (BART, LoRA, one learned query per task output)
        -> task decoders: classification, VQA answer, caption generation, reconstruction

With `model.rag_k > 0` the receiver also retrieves (`Retriever`): the LAM decoder
cross-attends to the received tokens and to the k chunks of a knowledge base that best
match a query made from the received question (models/mtsc/knowledge.py).

`Transmitter` is the client half and `Receiver` the server half of the U-shaped split;
`TaskDecoders` hold the labels' side and never leave the client. The LAM is a BART
encoder-decoder built from a config (random init, the same seed on every party, which
stands in for shared pre-trained weights) or loaded from a local checkpoint folder; its
base weights are frozen and peft LoRA adapters on the attention projections are the
only tensors that leave a client (`shared_state`).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from torch import Tensor, nn
from transformers import BartConfig, BartModel

from common.config import ExperimentConfig
from common.data import num_classes, require, source_keys, text_vocab
from common.data.facts import fact_chunks, fact_table
from common.data.scenes import BOS_ID, EOS_ID, PAD_ID
from common.seeding import seeded
from models.channel import WirelessChannel
from models.jscc import JSCCDecoder, JSCCEncoder, JSCCOutput, sent_positions
from models.mtsc.compression import client_plan, dropped_adapter_keys, keep_encoder_layers
from models.mtsc.knowledge import KnowledgeBase, LamEmbedder, TransformersEmbedder

# Decoder query layout: one query per scalar task, one per reconstructed image patch.
Q_CLS, Q_VQA, Q_CAP, Q_REC = 0, 1, 2, 3

# What each task needs from the data source besides the image (reconstruction: nothing).
TASK_NEEDS = {"classification": ("label",), "vqa": ("question", "answer"),
              "captioning": ("caption",)}


def data_needs(cfg: ExperimentConfig) -> dict[str, str]:
    """{annotation: task} for the configured tasks, for `load_partition(needs=...)`: a
    source that lacks one fails naming the task, the column and how to add it."""
    return {key: task for task in cfg.model.tasks for key in TASK_NEEDS.get(task, ())}


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
    vocab = text_vocab(cfg.data)
    bart_cfg = BartConfig(
        vocab_size=len(vocab.words),
        d_model=m.d_model,
        encoder_layers=m.layers,
        decoder_layers=m.layers,
        encoder_attention_heads=m.heads,
        decoder_attention_heads=m.heads,
        encoder_ffn_dim=m.ffn_dim,
        decoder_ffn_dim=m.ffn_dim,
        max_position_embeddings=max(64, n_patches + vocab.question_len + 8),
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
    pooling keeps small shapes' evidence that a strided projection averages away.
    `width` scales the hidden channels (a compressed client's thinner encoder)."""

    def __init__(self, d_model: int, patch: int, n_patches: int, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        ch, stride = 3, 1
        while stride < patch:
            out = d_model if stride * 2 == patch else max(4, round(32 * stride * width))
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

    def __init__(self, cfg: ExperimentConfig, lam_encoder: nn.Module, d_model: int,
                 encoder_width: float = 1.0):
        super().__init__()
        n_patches = (cfg.data.image_size // cfg.model.patch_size) ** 2
        self.image_encoder = PatchEncoder(d_model, cfg.model.patch_size, n_patches,
                                          encoder_width)
        self.text_embedding = nn.Embedding(len(text_vocab(cfg.data).words), d_model,
                                           padding_idx=PAD_ID)
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


class Retriever(nn.Module):
    """Retrieval at the receiver: a query from the received question tokens, the k best
    chunks of the knowledge base (faiss), and their token states as extra memory for the
    LAM decoder (fusion in the decoder: it cross-attends to all k chunks at once).

    The query is what the receiver has: the JSCC decoder's output at the question's
    positions (the transmitter sends [image tokens, question tokens]), so it degrades
    with the SNR. It is trained towards the embedding of the question's own words
    (`query_loss`), the space the chunks are indexed in; the index itself is
    never trained, so a rewritten chunk is read as written. The chunks are read through
    the frozen LAM encoder (contextual token states, so each word carries its chunk's
    other words) and a learned projection. The knowledge base is a plain attribute, not
    a parameter or buffer: it is in no state dict and no message.
    """

    def __init__(self, cfg: ExperimentConfig, embedder: LamEmbedder, key_embedder,
                 d_model: int):
        super().__init__()
        self.question_len = text_vocab(cfg.data).question_len
        self.k = cfg.model.rag_k
        self.embedder = embedder  # frozen: reads the chunks (and embeds them by default)
        self.key_embedder = key_embedder  # what the index was made with
        self.query = nn.Sequential(nn.Linear(self.question_len * d_model, 2 * d_model), nn.GELU(),
                                   nn.Linear(2 * d_model, key_embedder.dim))
        self.read = nn.Linear(d_model, d_model)
        self.position = nn.Parameter(torch.randn(cfg.model.rag_chunk_len, d_model) * 0.02)
        self.relevance = nn.Parameter(torch.randn(d_model) * d_model ** -0.5)
        self._knowledge: KnowledgeBase | None = None
        self._tokens: Tensor | None = None
        self.last_query: Tensor | None = None  # the latest forward's, for query_loss

    @property
    def knowledge(self) -> KnowledgeBase | None:
        return self._knowledge

    @knowledge.setter
    def knowledge(self, kb: KnowledgeBase | None) -> None:
        """Swap in a knowledge base (an update needs no training step)."""
        if kb is not None:
            kb.check_embedder(self.key_embedder)
        self._knowledge = kb
        self._tokens = None if kb is None else self.embedder.tokens(kb.texts)

    def forward(self, memory: Tensor) -> tuple[Tensor, Tensor] | None:
        """(context [B, k*L, D], its keep mask [B, k*L]), or None with k = 0."""
        self.last_query = self.query(memory[:, -self.question_len:].flatten(1))
        kb = self._knowledge
        if self.k <= 0 or kb is None or len(kb) == 0:
            return None
        query = F.normalize(self.last_query.detach().float(), dim=-1).cpu().numpy()
        scores, rows = kb.search(query, self.k)
        tokens = self._tokens[torch.from_numpy(rows)].to(memory.device)  # [B, k, L]
        b, k, length = tokens.shape
        with torch.no_grad():
            words = self.embedder.encoder.embed_tokens(tokens).to(memory.dtype)
        # How far each chunk's score is below the best one's (0 for the best): tells the
        # decoder how much the retriever trusts a chunk, for any k.
        gap = torch.from_numpy(scores - scores[:, :1]).to(memory.device, memory.dtype)
        gap = gap.clamp_min(-1.0)[:, :, None, None] * 10.0
        context = self.read(words) + self.position + gap * self.relevance
        return context.reshape(b, k * length, -1), (tokens != PAD_ID).reshape(b, k * length)

    def query_loss(self, question: Tensor, temperature: float = 0.05) -> Tensor:
        """InfoNCE of the latest batch's queries against the embeddings of the batch's
        distinct questions (in-batch negatives, as dense retrievers are trained): each
        query must come closer to its own question's words than to any other question's.
        Regressing on the cosine alone is not enough: questions share most of their
        words, so a query at cosine 0.9 may still be nearest another question's fact."""
        distinct, own = torch.unique(question, dim=0, return_inverse=True)
        if isinstance(self.key_embedder, LamEmbedder):
            target = self.key_embedder.embed_tokens(distinct)
        else:
            vocab = self.embedder.vocab
            target = torch.from_numpy(self.key_embedder.embed(
                [vocab.decode(q.tolist()) for q in distinct])).to(question.device)
        query = F.normalize(self.last_query, dim=-1)
        logits = query @ target.to(query.dtype).T / temperature
        return F.cross_entropy(logits, own)


class Receiver(nn.Module):
    """Server half: JSCC decoder -> LAM decoder (LoRA) driven by learned task queries,
    with retrieved chunks in its memory when a `retriever` is set (model.rag_k > 0)."""

    def __init__(self, cfg: ExperimentConfig, lam_decoder: nn.Module, d_model: int):
        super().__init__()
        n_patches = (cfg.data.image_size // cfg.model.patch_size) ** 2
        self.jscc_decoder = JSCCDecoder(d_model, cfg.model.jscc_symbols)
        self.lam_decoder = lam_decoder
        self.task_queries = nn.Parameter(torch.randn(Q_REC + n_patches, d_model) * 0.02)
        self.retriever: Retriever | None = None  # set by build() for model.rag_k > 0

    def forward(self, received: Tensor, mask: Tensor, snr_db: Tensor) -> Tensor:
        memory = self.jscc_decoder(received, mask, snr_db)
        queries = self.task_queries.unsqueeze(0).expand(received.shape[0], -1, -1)
        n_rec = queries.shape[1] - Q_REC
        # Reconstruction positions start from the received image tokens themselves (plus
        # a learned per-patch query): the patch content rides the residual stream
        # instead of having to be found again by cross-attention.
        queries = torch.cat([queries[:, :Q_REC], queries[:, Q_REC:] + memory[:, :n_rec]], dim=1)
        retrieved = None if self.retriever is None else self.retriever(memory)
        if retrieved is None:
            out = self.lam_decoder(inputs_embeds=queries, encoder_hidden_states=memory)
        else:
            context, keep = retrieved
            keep = torch.cat([torch.ones(memory.shape[:2], dtype=torch.long,
                                         device=memory.device), keep.long()], dim=1)
            out = self.lam_decoder(inputs_embeds=queries,
                                   encoder_hidden_states=torch.cat([memory, context], dim=1),
                                   encoder_attention_mask=keep)
        return out.last_hidden_state  # [B, Q, D]


class CaptionDecoder(nn.Module):
    """A GRU language model conditioned on the caption query's state (teacher forcing),
    over the `vocab_size` words of the source's vocabulary (common/data/text.py)."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD_ID)
        self.init = nn.Linear(d_model, d_model)
        self.gru = nn.GRU(2 * d_model, d_model, batch_first=True)
        self.out = nn.Linear(d_model, vocab_size)

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
    """Client-private heads; they see labels and never leave the client.

    Every head is built whichever tasks are on (so a model's shapes and seeded values do
    not depend on model.tasks); one whose annotation the source lacks gets a single
    output, and its task is refused (`data_needs`) before it could be used."""

    def __init__(self, cfg: ExperimentConfig, d_model: int):
        super().__init__()
        p = cfg.model.patch_size
        self.tasks = list(cfg.model.tasks)
        self.patch, self.side = p, cfg.data.image_size // p
        vocab = text_vocab(cfg.data)
        has_labels = "label" in source_keys(cfg.data)
        self.classification = nn.Linear(d_model, num_classes(cfg.data) if has_labels else 1)
        self.vqa = nn.Linear(d_model, max(len(vocab.answers), 1))
        self.captioning = CaptionDecoder(d_model, len(vocab.words))
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
    def __init__(self, cfg: ExperimentConfig, lam: BartModel, encoder_width: float = 1.0):
        super().__init__()
        d = lam.config.d_model
        self.cfg = cfg
        self.transmitter = Transmitter(cfg, lam.encoder, d, encoder_width)
        self.channel = WirelessChannel(cfg.channel)
        self.receiver = Receiver(cfg, lam.decoder, d)
        self.task_decoders = TaskDecoders(cfg, d)
        # A compressed client's plan (models/mtsc/compression.py) and the shared-state
        # keys of the LAM encoder layers it does not hold (with their shapes); None / {}
        # for the full model.
        self.compression = None
        self.dropped_adapters: dict[str, np.ndarray] = {}

    def uplink(self, batch: dict[str, Tensor], snr_db: Tensor | None = None,
               generator: torch.Generator | None = None, transmitter: nn.Module | None = None
               ) -> tuple[JSCCOutput, Tensor, Tensor]:
        """Client half and channel: (what the JSCC sent, what arrives, the SNR).
        `transmitter`: another module in place of the model's own (the deployed int8
        one, models/mtsc/compression.py)."""
        image = batch["image"]
        if snr_db is None:
            snr_db = self.channel.sample_snr_db(image.shape[0], image.device, generator)
        question = batch.get("question") if "vqa" in self.cfg.model.tasks else None
        tx = (transmitter or self.transmitter)(image, question, snr_db)
        received = self.channel(tx.symbols, snr_db, generator)
        # Only what was sent arrives: the receiver sees no noise where the JSCC sent
        # nothing (so the mask's gradient there is 0, as in the split over the wire).
        received = torch.where(sent_positions(tx.counts, received.shape[-1]), received, 0)
        return tx, received, snr_db

    def forward(self, batch: dict[str, Tensor], snr_db: Tensor | None = None,
                generator: torch.Generator | None = None,
                transmitter: nn.Module | None = None) -> tuple[Tensor, JSCCOutput]:
        tx, received, snr_db = self.uplink(batch, snr_db, generator, transmitter)
        return self.receiver(received, tx.mask, snr_db), tx


def knowledge_embedder(cfg: ExperimentConfig) -> LamEmbedder:
    """The frozen base LAM encoder as an embedder: the same seed (or checkpoint) as every
    party's LAM, so every party embeds alike."""
    m = cfg.model
    lam = build_lam(cfg)
    source = m.checkpoint or f"seed={cfg.seed} layers={m.layers} heads={m.heads} ffn={m.ffn_dim}"
    vocab = text_vocab(cfg.data)
    return LamEmbedder(lam.encoder, vocab, m.rag_chunk_len,
                       f"lam {source} d_model={lam.config.d_model} vocab={len(vocab.words)}")


def key_embedder(cfg: ExperimentConfig, lam_embedder: LamEmbedder):
    """What the index is embedded with: the LAM, or model.knowledge_embedder."""
    path = cfg.model.knowledge_embedder
    return lam_embedder if path is None else TransformersEmbedder(path)


def load_knowledge(cfg: ExperimentConfig, embedder) -> KnowledgeBase:
    """model.knowledge_base, or (null) the facts of the synthetic table of data.seed: the
    same public base on every party, built from the config or read from the same file."""
    m = cfg.model
    if m.knowledge_base is not None:
        return KnowledgeBase.load(m.knowledge_base, embedder)
    return KnowledgeBase.from_chunks(fact_chunks(fact_table(cfg.data.seed)), embedder,
                                     m.ivf_above, m.rag_nprobe)


def build(cfg: ExperimentConfig, device: torch.device | str = "cpu",
          lora_rank: int | None = None) -> MTSCModel:
    """The whole model: frozen LAM base + LoRA (shared seed) + private modules. Fails
    first when the data source lacks what a task needs (so the server, which builds
    the model but reads no partition, refuses the run as a client would). With a
    `model.transmitter_budget` (this client's, models/client_state.py) its transmitter
    is compressed to fit (models/mtsc/compression.py)."""
    rank = lora_rank or cfg.lora.rank
    return build_compressed(cfg, device, rank, client_plan(cfg, rank, build_compressed))


def build_compressed(cfg: ExperimentConfig, device: torch.device | str, lora_rank: int,
                     plan=None) -> MTSCModel:
    """`build` with an explicit compression `plan` (models/mtsc/compression.Plan; None:
    the full model). The LAM is built whole from the shared seed, so the layers a client
    keeps are the shared model's first ones, with the adapters every full client starts
    from at that rank; the dropped layers' adapter keys are kept on the model
    (`dropped_adapters`) so the server's full adapters can be checked and skipped."""
    require(cfg.data, data_needs(cfg))
    lam = build_lam(cfg)
    lora = LoraConfig(
        r=lora_rank if plan is None else plan.lora_rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
    )
    with seeded(cfg.lora.init_seed):  # every client starts from the same A matrices
        inject_adapter_in_model(lora, lam.encoder)
        inject_adapter_in_model(lora, lam.decoder)
    model_cfg = cfg
    if plan is not None and plan.jscc_symbols != cfg.model.jscc_symbols:
        model_cfg = copy.deepcopy(cfg)
        model_cfg.sections["model"] = dataclasses.replace(cfg.model,
                                                          jscc_symbols=plan.jscc_symbols)
    with seeded(cfg.seed + 1):
        model = MTSCModel(model_cfg, lam, 1.0 if plan is None else plan.share)
    for name, p in model.named_parameters():
        if "lam_" in name and "lora_" not in name:
            p.requires_grad_(False)  # the LAM's base weights stay frozen
    if plan is not None:
        encoder_state = {f"encoder.{k}": v for k, v in
                         get_peft_model_state_dict(lam.encoder).items()}
        dropped = dropped_adapter_keys(len(lam.encoder.layers), plan.layers, list(encoder_state))
        model.dropped_adapters = {k: encoder_state[k].detach().float().numpy() for k in dropped}
        keep_encoder_layers(lam.encoder, plan.layers)
        model.compression = plan
    if cfg.model.rag_k > 0:
        # Built after the rest (its own seed), so every other tensor equals the model's
        # without retrieval.
        embedder = knowledge_embedder(cfg)
        keys = key_embedder(cfg, embedder)
        with seeded(cfg.seed + 5):
            model.receiver.retriever = Retriever(cfg, embedder, keys, lam.config.d_model)
        model.receiver.retriever.knowledge = load_knowledge(cfg, keys)
    if cfg.privacy.dp.mode == "local":
        _prepare_for_dp_sgd(model, cfg)
    # On its device before any DP wrapping: Opacus wrapping a peft model first and
    # moving it after leaves the adapters silently untrained.
    return model.to(device)


def _prepare_for_dp_sgd(model: MTSCModel, cfg: ExperimentConfig) -> None:
    """Under DP-SGD the client trains the LoRA adapters and its task decoders only
    (LAM-MTSC's privacy-relevant tensors): the modality encoders, the JSCC and the
    receiver's task queries stay at their seeded initial values. Opacus computes
    per-example gradients of those trainable layers; its GRU stands in for torch's,
    whose fused kernel gives none (ModuleValidator.fix, seeded like the rest)."""
    from opacus.validators import ModuleValidator

    with seeded(cfg.seed + 4):
        model.task_decoders.captioning.gru = ModuleValidator.fix(model.task_decoders.captioning.gru)
    for name, p in model.named_parameters():
        if "lora_" not in name and not name.startswith("task_decoders."):
            p.requires_grad_(False)


def set_trainable(model: MTSCModel, lora_train: str) -> None:
    """FFA-LoRA freezes A; everything private and every B stays trainable."""
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(lora_train == "ab")
        elif "lora_B" in name:
            p.requires_grad_(True)
