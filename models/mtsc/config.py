"""The `mtsc` workload's config section (`model:`) and its checks."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from common.config import LORA_STRATEGIES, TASKS, ExperimentConfig, need


@dataclass
class ModelConfig:
    d_model: int = 64
    layers: int = 2  # encoder and decoder layers of the BART-style LAM
    heads: int = 4
    ffn_dim: int = 128
    checkpoint: str | None = None  # local folder with a BART checkpoint (config + weights)
    patch_size: int = 8  # image patch -> one LAM token
    jscc_symbols: int = 16  # complex channel symbols per token at full rate
    min_rate: float = 0.25  # share of tokens sent at the highest SNR
    rate_snr_db: list[float] = field(default_factory=lambda: [0.0, 20.0])
    caption_len: int = 12
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    # Retrieval at the receiver (models/mtsc/knowledge.py, docs/rag.md): the LAM decoder
    # reads the rag_k best chunks of the knowledge base besides the received tokens.
    # 0: no retrieval, the model exactly as without these keys.
    rag_k: int = 0
    # The knowledge base file (`python -m reports.knowledge rebuild`); null: the facts
    # of the synthetic fact table of data.seed (data.questions: knowledge).
    knowledge_base: str | None = None
    knowledge_embedder: str | None = None  # a local sentence-embedding model; null: the LAM
    ivf_above: int = 10_000  # more chunks than this: an IVF index instead of the exact one
    rag_nprobe: int = 8  # inverted lists an IVF search visits
    rag_chunk_len: int = 12  # tokens of a chunk the decoder reads (BOS + words + EOS)
    rag_query_weight: float = 1.0  # weight of the retrieval query's loss in training
    # A transmitter sized to each client (models/mtsc/compression.py, docs/compression.md):
    # budgets round-robin over partitions, each a share of the full compute in (0, 1] or a
    # memory size ("300kB"); [] and no node budget: every client the full model.
    client_budgets: list[float | str] = field(default_factory=list)
    # This node's own budget (node config transmitter-budget); it wins over the table.
    transmitter_budget: str | None = None


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]?i?b)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """What a client can afford (models/mtsc/compression.py): `compute`, a share of the
    full transmitter's FLOPs, or `memory`, bytes of transmitter weights."""

    kind: str  # "compute" | "memory"
    amount: float


def parse_budget(value: float | str) -> Budget:
    """A budget from config: a number in (0, 1] is a compute share; a size with a unit
    (B, kB, MB, GB, KiB, MiB, GiB) is memory. Raises ValueError naming the value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and (size := _SIZE.fullmatch(value)):
        return Budget("memory", float(size.group(1)) * _UNITS[size.group(2).lower()])
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
    if not 0 < number <= 1:
        raise ValueError(f"transmitter budget {value!r}: expected a share of the full "
                         "compute in (0, 1] (e.g. 0.5) or a memory size with a unit "
                         "(e.g. '300kB', '1.5MiB')")
    return Budget("compute", number)


SECTIONS = {"model": ModelConfig}
SPLIT = True  # the U-shaped split of LAM-MTSC (models/mtsc/split.py)
STRATEGIES = LORA_STRATEGIES  # it shares LoRA adapters


def check(cfg: ExperimentConfig) -> None:
    m, d = cfg.model, cfg.data
    need(d.image_size % m.patch_size == 0, "data.image_size", d.image_size,
         f">= 16 and a multiple of model.patch_size ({m.patch_size})")
    need(m.d_model % m.heads == 0, "model.d_model", m.d_model,
         f"a multiple of model.heads ({m.heads})")
    need(m.layers >= 1, "model.layers", m.layers, ">= 1")
    need(m.jscc_symbols >= 1, "model.jscc_symbols", m.jscc_symbols, ">= 1")
    need(0 < m.min_rate <= 1, "model.min_rate", m.min_rate, "0 < x <= 1")
    need(len(m.rate_snr_db) == 2 and m.rate_snr_db[0] < m.rate_snr_db[1],
         "model.rate_snr_db", m.rate_snr_db, "[low_db, high_db] with low < high")
    need(len(m.tasks) > 0 and all(t in TASKS for t in m.tasks), "model.tasks", m.tasks,
         f"a non-empty list drawn from {list(TASKS)}")
    # Whether the data source has each task's annotation (labels, captions, questions and
    # answers) is checked where the source is read: models/mtsc/model.py, data_needs.
    need(m.rag_k >= 0, "model.rag_k", m.rag_k, ">= 0 (0: no retrieval)")
    if m.rag_k > 0:
        need(m.knowledge_base is not None or d.questions == "knowledge", "model.knowledge_base",
             m.knowledge_base, "a knowledge base file (python -m reports.knowledge rebuild), "
             "or null with data.questions=knowledge (the synthetic facts), for model.rag_k > 0")
        need("vqa" in m.tasks, "model.tasks", m.tasks,
             "a list with 'vqa' for model.rag_k > 0 (the query is the received question)")
        need(m.rag_chunk_len >= 3, "model.rag_chunk_len", m.rag_chunk_len, ">= 3")
        need(m.ivf_above >= 1 and m.rag_nprobe >= 1, "model.ivf_above / model.rag_nprobe",
             (m.ivf_above, m.rag_nprobe), "integers >= 1")
        need(m.rag_query_weight >= 0, "model.rag_query_weight", m.rag_query_weight, ">= 0")
        # Counterfactual fact tables are drawn by the training loop per batch; the split's
        # two halves would have to draw the same one at every step.
        need(d.questions != "knowledge" or cfg.split.mode == "off", "split.mode",
             cfg.split.mode, "'off' to train the knowledge task (data.questions=knowledge) "
             "with retrieval; a model trained so retrieves in the split's server half as is")
        need(cfg.privacy.dp.mode != "local", "privacy.dp.mode", cfg.privacy.dp.mode,
             "not 'local' with model.rag_k > 0 (DP-SGD does not cover the retrieval query)")
    budgets = list(m.client_budgets) + ([m.transmitter_budget] if m.transmitter_budget else [])
    if budgets:
        for value in budgets:
            try:
                parse_budget(value)
            except ValueError as err:
                need(False, "model.client_budgets / transmitter-budget", value, str(err))
        need(cfg.strategy.name == "svd_lora", "strategy.name", cfg.strategy.name,
             "'svd_lora' with transmitter budgets (compressed clients send fewer layers' "
             "adapters at lower ranks; svd_lora aggregates each over the clients holding it)")
        need(cfg.split.mode == "off", "split.mode", cfg.split.mode,
             "'off' with transmitter budgets (the split's server half has one size)")
    need(cfg.strategy.name in STRATEGIES, "strategy.name", cfg.strategy.name,
         f"one of {list(STRATEGIES)} for workload 'mtsc' (it shares LoRA adapters)")
