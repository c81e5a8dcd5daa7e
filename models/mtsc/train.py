"""Local training and evaluation of the `mtsc` workload (federated LoRA rounds)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from common.config import ExperimentConfig
from common.data.facts import MEANING_ANSWER0, MEANINGS, SUBJECTS, counterfactual_table, fact_text
from common.seeding import seeded
from models.mtsc.knowledge import KnowledgeBase
from models.mtsc.metrics import TaskScorer
from models.mtsc.model import Q_CLS, MTSCModel, Retriever, set_trainable

log = logging.getLogger("fedsemcom")


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


class CounterfactualFacts:
    """Fact tables redrawn for every batch of the knowledge task (common/data/facts.py).

    With one fixed table a small model learns "red circle -> apple" from the question
    and ignores what it retrieves, so a rewritten fact would change nothing. Here each
    batch gets its own table, seeded by (seed, epoch, step): the batch's answers and the
    knowledge base the receiver retrieves from follow it, so reading the retrieved fact
    is the only way to be right. The chunk of every (subject, meaning) is embedded once.
    """

    def __init__(self, retriever: Retriever, cfg: ExperimentConfig):
        self.m = cfg.model
        self.texts = [[fact_text(s, m) for m in range(len(MEANINGS))] for s in range(len(SUBJECTS))]
        flat = [t for row in self.texts for t in row]
        self.embeddings = retriever.key_embedder.embed(flat).reshape(
            len(SUBJECTS), len(MEANINGS), -1)
        self.fingerprint = retriever.key_embedder.fingerprint

    def draw(self, *key: int) -> tuple[KnowledgeBase, Tensor]:
        """(the knowledge base of the table of `key`, the table: meaning id per subject)."""
        table = counterfactual_table(*key)
        rows = range(len(SUBJECTS))
        kb = KnowledgeBase(["-".join(SUBJECTS[s]) for s in rows],
                           [self.texts[s][table[s]] for s in rows],
                           self.embeddings[list(rows), table], self.fingerprint,
                           self.m.ivf_above, self.m.rag_nprobe)
        return kb, torch.from_numpy(table)


def train_local(model: MTSCModel, data: Dataset, cfg: ExperimentConfig,
                lora_train: str = "ab", seed: int = 0, make_private=None) -> dict[str, float]:
    """Local epochs of AdamW on the weighted sum of task losses.

    `seed` fixes the batch order, the per-example SNR draws and the channel noise, so
    a round is reproducible. `make_private(model, optimizer, loader)` (DP-SGD,
    privacy/dp.py) wraps the three before the first step."""
    torch.manual_seed(seed)
    set_trainable(model, lora_train)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
    )
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True, generator=gen)
    net = model
    if make_private is not None:
        net, opt, loader = make_private(model, opt, loader)
    weights = cfg.train.loss_weights
    amp_dtype = autocast_dtype(cfg.train.amp, device)
    # fp16 needs loss scaling against underflowing gradients; bf16 has fp32's range.
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    retriever = model.receiver.retriever
    kept_knowledge = None if retriever is None else retriever.knowledge
    facts = (CounterfactualFacts(retriever, cfg)
             if retriever is not None and cfg.data.questions == "knowledge" else None)
    k_draws = np.random.default_rng([seed, 0x4a6])
    k_levels = max(cfg.model.rag_k - 1, 0).bit_length() + 1  # 2**(levels-1) >= rag_k
    model.train()
    total, per_task, symbols, n_seen = 0.0, {}, 0.0, 0
    for epoch in range(cfg.train.local_epochs):
        for step, batch in enumerate(loader):
            if len(batch["image"]) == 0:  # Poisson sampling (DP-SGD) may draw no example
                continue
            if retriever is not None:
                # k = 1, 2, 4, ... up to model.rag_k, equally often: every such k can be
                # asked at inference, and the few-chunk batches teach reading first.
                retriever.k = min(2 ** int(k_draws.integers(k_levels)), cfg.model.rag_k)
            if facts is not None:
                retriever.knowledge, table = facts.draw(seed, epoch, step, 0xcf)
                batch = {**batch, "answer": MEANING_ANSWER0 + table[batch["subject"]]}
            batch = _to(batch, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                h, tx = net(batch)
                losses = model.task_decoders.losses(h, batch)
                loss = sum(weights.get(t, 1.0) * v for t, v in losses.items())
                if retriever is not None:
                    query_loss = retriever.query_loss(batch["question"])
                    loss = loss + cfg.model.rag_query_weight * query_loss
                    per_task["query"] = per_task.get("query", 0.0) + query_loss.item() * len(
                        batch["image"])
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
    if retriever is not None:
        retriever.knowledge, retriever.k = kept_knowledge, cfg.model.rag_k
    metrics = {"train_loss": total / n_seen, "symbols_per_example": symbols / n_seen}
    metrics.update({f"loss_{t}": v / n_seen for t, v in per_task.items()})
    metrics["num-examples"] = len(data)
    return metrics


def eval_batches(data: Dataset, cfg: ExperimentConfig) -> DataLoader:
    return DataLoader(data, batch_size=max(64, cfg.train.batch_size))


@torch.no_grad()
def evaluate(model: MTSCModel, data: Dataset, cfg: ExperimentConfig) -> dict[str, float]:
    """Task metrics (see TaskScorer) on the client's local test split. A client whose
    compression plan quantises its transmitter evaluates with the int8 transmitter it
    deploys (models/mtsc/compression.py), on the CPU."""
    with seeded(cfg.seed):  # the same SNR draws and channel noise at every evaluation
        device = next(model.parameters()).device
        model.eval()
        transmitter = _deployed(model, device)
        scorer = TaskScorer(cfg)
        for batch in eval_batches(data, cfg):
            batch = _to(batch, device)
            h, _ = model(batch, transmitter=transmitter)
            scorer.add(model.task_decoders, h, batch)
        return scorer.result()


def _deployed(model: MTSCModel, device: torch.device):
    """The int8 transmitter of a compressed client, or None (the model's own)."""
    plan = model.compression
    if plan is None or not plan.int8:
        return None
    if device.type != "cpu":
        log.warning("the int8 transmitter runs on the CPU only (torch's dynamic "
                    "quantisation); this node evaluates its transmitter on %s in fp32", device)
        return None
    from models.mtsc.compression import deployed_transmitter

    return deployed_transmitter(model.transmitter, int8=True)


@torch.no_grad()
def class_logits(model: MTSCModel, data: Dataset, cfg: ExperimentConfig) -> Tensor:
    """The classification head's logits [N, classes] of every example, in order, at the
    evaluation's seeded channel (membership inference reads them, reports/membership.py)."""
    with seeded(cfg.seed):
        device = next(model.parameters()).device
        model.eval()
        out = []
        for batch in eval_batches(data, cfg):
            h, _ = model(_to(batch, device))
            out.append(model.task_decoders.classification(h[:, Q_CLS]).float().cpu())
        return torch.cat(out)
