"""Experiment configuration: YAML files in `configs/` loaded into typed dataclasses.

Every key is checked at start: an unknown key, a value of the wrong type or a value
outside its allowed set stops the run with a message that names the key, the value
seen and what is allowed. `key=value` overrides (dotted keys, YAML values) apply on
top of the file, from the command line or from Flower's `--run-config`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TASKS = ("classification", "vqa", "captioning", "reconstruction")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class DataConfig:
    name: Literal["synthetic", "cifar10", "stl10", "digits"] = "synthetic"
    root: str | None = None  # local folder holding CIFAR-10 / STL-10
    download: bool = False  # fetch CIFAR-10 / STL-10 into `root` (needs internet); off by default
    num_samples: int = 3000  # synthetic scenes across all clients
    image_size: int = 32
    max_objects: int = 3
    seed: int = 0
    partitioner: Literal["iid", "dirichlet"] = "dirichlet"
    alpha: float = 0.5  # Dirichlet concentration; smaller is more heterogeneous
    test_fraction: float = 0.2  # share of each client's partition held out locally


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


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    client_ranks: list[int] = field(default_factory=list)  # per-client ranks (svd_lora)
    init_seed: int = 1234  # shared seed: every client starts from the same A matrices


@dataclass
class ChannelConfig:
    kind: Literal["awgn", "rayleigh", "rician", "none"] = "awgn"
    snr_db: float = 10.0
    snr_range_db: list[float] | None = None  # [low, high]: SNR sampled per example
    rician_k: float = 4.0  # Rician K-factor (linear): LOS power / scattered power
    sweep_snr_db: list[float] = field(default_factory=list)  # dB; evaluated at each after the last round


@dataclass
class TrainConfig:
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {t: 1.0 for t in TASKS}
    )
    # Mixed precision on CUDA (torch.autocast; fp16 adds a GradScaler). A node
    # without CUDA trains in fp32 and logs that it did.
    amp: Literal["none", "bf16", "fp16"] = "none"


@dataclass
class StrategyConfig:
    name: Literal["fedavg_lora", "ffa_lora", "svd_lora", "fedmedian_lora",
                  "trimmed_avg_lora", "krum_lora", "fedavg", "fedprox"] = "fedavg_lora"
    svd_rank: int = 16  # target rank of the re-factorised global update (svd_lora)
    proximal_mu: float = 0.0  # FedProx: weight of (mu/2)||w - w_global||^2 in local training
    max_update_bytes: int | None = None  # replies with larger payloads are dropped
    trim_beta: float = 0.2  # share cut at each end per coordinate (trimmed_avg_lora)
    krum_malicious: int = 0  # malicious clients Krum tolerates (krum_lora)


@dataclass
class SplitConfig:
    """U-shaped split training over Flower messages (LAM-MTSC federated split
    fine-tuning). "off" trains the whole model on the client (federated LoRA)."""

    mode: Literal["off", "sequential", "parallel"] = "off"
    compression: Literal["none", "float16", "bfloat16", "int8"] = "none"
    # A second channel for the server's output on its way back to the client.
    downlink: ChannelConfig = field(default_factory=lambda: ChannelConfig(kind="none"))
    steps_per_round: int | None = None  # None: train.local_epochs over the client's data
    # A client silent this long in a step is dropped for the round (the first message,
    # which loads data and builds the model, and evaluation wait round_timeout_s).
    client_timeout_s: float = 60.0
    poll_interval_s: float = 0.01  # how often the server looks for replies


@dataclass
class TeacherConfig:
    """The tosc teacher: the TOSC system around a ResNet-18 encoder, trained centrally
    on a public split of synthetic scenes that no client owns, saved to `checkpoint`."""

    checkpoint: str = "runs/teachers/teacher.pt"  # local file; trained and written when missing
    seed: int = 0  # the teacher's own seed: students of any `seed` can share one teacher
    latent_dim: int = 32  # real latent dims of the teacher's channel input
    hidden: int = 256  # width of the teacher's semantic decoder
    public_samples: int = 2000  # scenes num_samples .. num_samples + public_samples - 1
    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3


@dataclass
class DistillConfig:
    """Teacher -> student distillation of the tosc workload."""

    beta: float = 1e-3  # information bottleneck: weight of KL(q(z|x) || N(0, I))
    temperature: float = 4.0  # softening of teacher and student logits in the KD term
    task_weight: float = 1.0  # cross-entropy to the labels
    kd_weight: float = 1.0  # KL to the teacher's softened predictions (0: no distillation)
    feature_weight: float = 0.0  # MSE to the teacher's features (0: no feature matching)
    top_k: int = 4  # teacher logits kept per example in the pre-stored outputs
    latent_dim: int = 16  # real latent dims; latent_dim / 2 complex channel symbols
    width: int = 16  # channels of the student's first conv layer
    hidden: int = 64  # width of the student's semantic decoder
    store_dir: str | None = None  # pre-stored teacher outputs (default: beside the checkpoint)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class SimulationConfig:
    backend: Literal["ray"] = "ray"
    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    workload: Literal["mtsc", "tosc"] = "mtsc"
    seed: int = 0
    rounds: int = 3
    num_clients: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_clients: int = 2
    round_timeout_s: float = 600.0
    device: str = "auto"
    output_dir: str = "runs"
    # Where each client keeps its private tensors after every round, so that a
    # resumed run continues them exactly; relative to the client's working
    # directory. The SuperNode's node config `state-dir` overrides it. None: kept
    # in memory only (a resumed run restarts the private modules from scratch).
    client_state_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# --------------------------------------------------------------------------- parsing


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': got {value!r}, expected {_describe(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': got {value!r}, expected a mapping")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported annotation {tp!r} for '{key}'")


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(
                f"unknown config key '{path}'. Allowed keys here: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _check_ranges(cfg: ExperimentConfig) -> None:
    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': got {value!r}, allowed: {allowed}")

    need(cfg.rounds >= 1, "rounds", cfg.rounds, "an integer >= 1")
    need(cfg.num_clients >= 1, "num_clients", cfg.num_clients, "an integer >= 1")
    need(0 < cfg.fraction_train <= 1, "fraction_train", cfg.fraction_train, "0 < x <= 1")
    need(
        0 <= cfg.fraction_evaluate <= 1,
        "fraction_evaluate",
        cfg.fraction_evaluate,
        "0 <= x <= 1",
    )
    need(
        1 <= cfg.min_train_clients <= cfg.num_clients,
        "min_train_clients",
        cfg.min_train_clients,
        f"1 .. num_clients ({cfg.num_clients})",
    )
    need(cfg.round_timeout_s > 0, "round_timeout_s", cfg.round_timeout_s, "> 0 seconds")
    need(
        cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
        "device",
        cfg.device,
        "'auto', 'cpu', 'cuda' or 'cuda:N'",
    )
    d = cfg.data
    need(d.num_samples >= 2 * cfg.num_clients, "data.num_samples", d.num_samples,
         f">= 2 * num_clients ({2 * cfg.num_clients})")
    need(d.image_size >= 16 and d.image_size % cfg.model.patch_size == 0,
         "data.image_size", d.image_size,
         f">= 16 and a multiple of model.patch_size ({cfg.model.patch_size})")
    need(1 <= d.max_objects <= 4, "data.max_objects", d.max_objects, "1 .. 4")
    need(d.alpha > 0, "data.alpha", d.alpha, "> 0")
    need(0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "0 < x < 1")
    m = cfg.model
    need(m.d_model % m.heads == 0, "model.d_model", m.d_model,
         f"a multiple of model.heads ({m.heads})")
    need(m.layers >= 1, "model.layers", m.layers, ">= 1")
    need(m.jscc_symbols >= 1, "model.jscc_symbols", m.jscc_symbols, ">= 1")
    need(0 < m.min_rate <= 1, "model.min_rate", m.min_rate, "0 < x <= 1")
    need(len(m.rate_snr_db) == 2 and m.rate_snr_db[0] < m.rate_snr_db[1],
         "model.rate_snr_db", m.rate_snr_db, "[low_db, high_db] with low < high")
    need(len(m.tasks) > 0 and all(t in TASKS for t in m.tasks), "model.tasks", m.tasks,
         f"a non-empty list drawn from {list(TASKS)}")
    if d.name != "synthetic":
        extra = [t for t in m.tasks if t not in ("classification", "reconstruction")]
        need(not extra, "model.tasks", m.tasks,
             f"only classification and reconstruction for data.name={d.name!r} "
             "(captions and questions exist only in the synthetic scenes)")
    if d.name in ("cifar10", "stl10"):
        need(d.root is not None, "data.root", d.root,
             f"a local folder holding {d.name} (nothing is downloaded)")
    lo = cfg.lora
    need(lo.rank >= 1, "lora.rank", lo.rank, ">= 1")
    need(all(r >= 1 for r in lo.client_ranks), "lora.client_ranks", lo.client_ranks,
         "ranks >= 1")
    need(not lo.client_ranks or cfg.strategy.name == "svd_lora", "lora.client_ranks",
         lo.client_ranks, "empty unless strategy.name is 'svd_lora' (FedIT and FFA-LoRA "
         "average factors, which needs one rank for all clients)")
    need(0 <= lo.dropout < 1, "lora.dropout", lo.dropout, "0 <= x < 1")
    c = cfg.channel
    need(c.rician_k >= 0, "channel.rician_k", c.rician_k, ">= 0")
    if c.snr_range_db is not None:
        need(len(c.snr_range_db) == 2 and c.snr_range_db[0] <= c.snr_range_db[1],
             "channel.snr_range_db", c.snr_range_db, "[low_db, high_db] with low <= high")
    t = cfg.train
    need(t.local_epochs >= 1, "train.local_epochs", t.local_epochs, ">= 1")
    need(t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1")
    need(t.lr > 0, "train.lr", t.lr, "> 0")
    unknown = [k for k in t.loss_weights if k not in TASKS]
    need(not unknown, "train.loss_weights", t.loss_weights, f"keys drawn from {list(TASKS)}")
    need(cfg.strategy.svd_rank >= 1, "strategy.svd_rank", cfg.strategy.svd_rank, ">= 1")
    need(0 <= cfg.strategy.trim_beta < 0.5, "strategy.trim_beta", cfg.strategy.trim_beta,
         "0 <= x < 0.5")
    need(cfg.strategy.krum_malicious >= 0, "strategy.krum_malicious",
         cfg.strategy.krum_malicious, ">= 0")
    sp = cfg.split
    need(sp.steps_per_round is None or sp.steps_per_round >= 1, "split.steps_per_round",
         sp.steps_per_round, "null (local_epochs over the data) or an integer >= 1")
    need(sp.client_timeout_s > 0, "split.client_timeout_s", sp.client_timeout_s, "> 0 seconds")
    need(0 < sp.poll_interval_s <= 1, "split.poll_interval_s", sp.poll_interval_s,
         "0 < x <= 1 seconds")
    if sp.mode != "off":
        need(cfg.workload == "mtsc", "split.mode", sp.mode,
             f"'off' for workload {cfg.workload!r} (only mtsc has a U-shaped split)")
        need(not lo.client_ranks, "split.mode", sp.mode,
             "'off' when lora.client_ranks is set (the server half has one rank)")
    st = cfg.strategy
    need(st.proximal_mu >= 0, "strategy.proximal_mu", st.proximal_mu, ">= 0")
    need(st.proximal_mu == 0 or st.name == "fedprox", "strategy.proximal_mu", st.proximal_mu,
         "0 unless strategy.name is 'fedprox'")
    lora_strategies = ("fedavg_lora", "ffa_lora", "svd_lora", "fedmedian_lora",
                       "trimmed_avg_lora", "krum_lora")
    if cfg.workload == "mtsc":
        need(st.name in lora_strategies, "strategy.name", st.name,
             f"one of {list(lora_strategies)} for workload 'mtsc' (it shares LoRA adapters)")
    if cfg.workload == "tosc":
        need(st.name in ("fedavg", "fedprox"), "strategy.name", st.name,
             "'fedavg' or 'fedprox' for workload 'tosc' (it shares student weights)")
        _check_distill(cfg, need)
    s = cfg.simulation
    need(s.num_cpus_per_client > 0, "simulation.num_cpus_per_client",
         s.num_cpus_per_client, "> 0 (and at most the machine's cores)")
    need(s.num_gpus_per_client >= 0, "simulation.num_gpus_per_client",
         s.num_gpus_per_client, ">= 0")


def _check_distill(cfg: ExperimentConfig, need) -> None:
    dc, t = cfg.distill, cfg.distill.teacher
    need(cfg.data.name == "synthetic", "data.name", cfg.data.name,
         "'synthetic' for workload 'tosc' (the teacher's public split is drawn from "
         "synthetic scenes that no client owns)")
    need(cfg.model.tasks == ["classification"], "model.tasks", cfg.model.tasks,
         "[classification] for workload 'tosc' (the student is a classifier)")
    need(dc.beta >= 0, "distill.beta", dc.beta, ">= 0")
    need(dc.temperature > 0, "distill.temperature", dc.temperature, "> 0")
    for key in ("task_weight", "kd_weight", "feature_weight"):
        need(getattr(dc, key) >= 0, f"distill.{key}", getattr(dc, key), ">= 0")
    need(1 <= dc.top_k <= 4, "distill.top_k", dc.top_k,
         "1 .. 4 (the synthetic scenes have 4 classes)")
    need(dc.latent_dim >= 2 and dc.latent_dim % 2 == 0, "distill.latent_dim", dc.latent_dim,
         "an even integer >= 2 (two real dims make one complex channel symbol)")
    need(dc.width >= 1, "distill.width", dc.width, ">= 1")
    need(dc.hidden >= 1, "distill.hidden", dc.hidden, ">= 1")
    need(t.latent_dim >= 2 and t.latent_dim % 2 == 0, "distill.teacher.latent_dim",
         t.latent_dim, "an even integer >= 2")
    need(t.hidden >= 1, "distill.teacher.hidden", t.hidden, ">= 1")
    need(t.public_samples >= 10, "distill.teacher.public_samples", t.public_samples, ">= 10")
    need(t.epochs >= 1, "distill.teacher.epochs", t.epochs, ">= 1")
    need(t.batch_size >= 1, "distill.teacher.batch_size", t.batch_size, ">= 1")
    need(t.lr > 0, "distill.teacher.lr", t.lr, "> 0")
    need(bool(t.checkpoint), "distill.teacher.checkpoint", t.checkpoint,
         "a local file path (it is trained and written there when missing)")


def parse_overrides(items: list[str] | str) -> dict[str, Any]:
    """Parse `a.b=value` items (a list, or one space-separated string) into a dict."""
    if isinstance(items, str):
        items = items.split()
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. rounds=5)"
            )
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})")
    return out


def _apply(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def resolve_path(path: str | Path) -> Path:
    """A config path as given, else relative to the project root (for `flwr run`)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return PROJECT_ROOT / p


def config_from_dict(raw: dict[str, Any], overrides: dict[str, Any] | None = None
                     ) -> ExperimentConfig:
    raw = json.loads(json.dumps(raw))  # deep copy; also rejects non-JSON values early
    for key, value in (overrides or {}).items():
        _apply(raw, key, value)
    cfg = _build(ExperimentConfig, raw)
    _check_ranges(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | str | dict | None = None
                ) -> ExperimentConfig:
    """Load a YAML experiment file, apply overrides, validate everything."""
    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(path)!r} not found. Pass a YAML file from configs/, "
            "e.g. --config configs/quickstart.yaml"
        )
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top")
    if overrides is not None and not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    return config_from_dict(raw, overrides)
