"""The `mtsc` workload's config section (`model:`) and its checks."""

from __future__ import annotations

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
    need(cfg.strategy.name in STRATEGIES, "strategy.name", cfg.strategy.name,
         f"one of {list(STRATEGIES)} for workload 'mtsc' (it shares LoRA adapters)")
