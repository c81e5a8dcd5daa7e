"""Experiment configuration: YAML files in `configs/` loaded into typed dataclasses.

Every key is checked at start: an unknown key, a value of the wrong type or a value
outside its allowed set stops the run with a message that names the key, the value
seen and what is allowed. `key=value` overrides (dotted keys, YAML values) apply on
top of the file, from the command line or from Flower's `--run-config`.

This module holds the engine's sections (data, lora, channel, train, strategy, split,
simulation). A workload's own section (`model` for mtsc, `distill` for tosc) is a
dataclass in its room's `config.py`, found through the registry (common/workloads.py)
and checked by that room's `check`; `cfg.<section>` reads it like any other.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from common.workloads import WORKLOADS, room

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The tasks the synthetic scenes annotate (a label, a question with its answer, a
# caption, the image itself); `train.loss_weights` weights them.
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
    # Synthetic scenes only. "flat": uniform shapes on a dark background (every earlier
    # result); "textured": a smooth coloured background with grain and striped
    # objects, hard enough that image codecs pay for detail (labels stay true).
    texture: Literal["flat", "textured"] = "flat"
    seed: int = 0
    partitioner: Literal["iid", "dirichlet"] = "dirichlet"
    alpha: float = 0.5  # Dirichlet concentration; smaller is more heterogeneous
    test_fraction: float = 0.2  # share of each client's partition held out locally


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
    # Flower's SecAgg+ for training rounds: the server sees masked updates and their sum only
    secure_aggregation: bool = False


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
class LabelLeakageConfig:
    """Audit of split training (Li et al., ICLR 2022): the server scores the gradients
    it receives with the norm and direction attacks; as an auditor it knows the labels
    and records the leakage AUC per class and round (privacy/label_leakage.py)."""

    audit: bool = False
    max_examples: int = 2048  # per client and round kept for the attacks


@dataclass
class SplitDefenceConfig:
    """Client-side defences of split training against label leakage."""

    gradient_noise_std: float = 0.0  # N(0, std^2) added to every entry of the returned gradient
    label_epsilon: float | None = None  # train on randomized-response labels (label DP at eps)


@dataclass
class DPConfig:
    """Differential privacy of training. `local` (privacy/dp.py): every client trains
    through Opacus' DP-SGD (per-example clipping to `max_grad_norm`, Gaussian noise,
    Poisson sampling) and accounts its own epsilon over every round it takes part in.
    `central` (privacy/central_dp.py): Flower's DP wrappers clip each client's update
    to `max_grad_norm` (on the server or on the client) and noise the mean."""

    mode: Literal["off", "local", "central"] = "off"
    clipping: Literal["server", "client"] = "server"  # where `central` clips the updates
    # One of the two: the noise multiplier itself, or the epsilon a client reaches after
    # `rounds` rounds of `train.local_epochs` (the noise multiplier is set for it).
    noise_multiplier: float | None = None
    epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    max_epsilon: float | None = None  # a client stops training before it would exceed this


@dataclass
class PrivacyConfig:
    dp: DPConfig = field(default_factory=DPConfig)
    label_leakage: LabelLeakageConfig = field(default_factory=LabelLeakageConfig)
    split_defence: SplitDefenceConfig = field(default_factory=SplitDefenceConfig)


@dataclass
class SimulationConfig:
    backend: Literal["ray"] = "ray"
    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    # An existing Ray cluster to run the clients on ("HOST:PORT" of its head, as `ray
    # start --head` prints it, or "auto"); None: the RAY_ADDRESS environment variable if
    # set, else a Ray instance of this machine started for the run.
    ray_address: str | None = None
    # How often the engine hands queued messages to the clients (simulation/dispatch.py);
    # None keeps Flower's own 0.1 s tick. Only the timing changes, never the results.
    dispatch_interval_s: float | None = 0.005


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    workload: str = "mtsc"  # a name of common.workloads.WORKLOADS
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
    # directory. A node-only key, as are device, data.root and data.download: a
    # SuperNode uses its node config `state-dir` and ignores the server's value
    # (fl_client/trust.py); the simulation's virtual nodes use this one. None: kept
    # in memory only (a resumed run restarts the private modules from scratch).
    client_state_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    # Every registered workload's section by its key (cfg.model, cfg.distill), so that
    # one config file names them all and a run records them all.
    sections: dict[str, Any] = field(default_factory=lambda: {
        key: cls() for key, cls in workload_sections().items()})

    def __getattr__(self, key: str) -> Any:
        # Called only for names that are not fields: a workload's section.
        sections = self.__dict__.get("sections")
        if sections is not None and key in sections:
            return sections[key]
        raise AttributeError(f"the experiment config has no key or section {key!r}")

    def to_dict(self) -> dict[str, Any]:
        """The config as the YAML file has it: sections at the top level."""
        out = dataclasses.asdict(self)
        out.update(out.pop("sections"))
        return out

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


def workload_sections() -> dict[str, type]:
    """Each registered workload's config section class, by its top-level key."""
    out: dict[str, type] = {}
    engine = {f.name for f in dataclasses.fields(ExperimentConfig)}
    for name in WORKLOADS:
        for key, cls in room(name, "config").SECTIONS.items():
            if key in engine or key in out:
                raise TypeError(f"workload {name!r} declares config section {key!r}, "
                                "which another part of the config already has")
            out[key] = cls
    return out


def _build_experiment(raw: dict[str, Any]) -> ExperimentConfig:
    sections = workload_sections()
    names = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name != "sections"]
    for key in raw:
        if key not in names and key not in sections:
            raise ConfigError(f"unknown config key '{key}'. Allowed keys here: "
                              f"{', '.join(names + list(sections))}")
    if "workload" in raw and raw["workload"] not in WORKLOADS:
        raise ConfigError(f"config key 'workload': got {raw['workload']!r}, expected one of "
                          f"{', '.join(repr(w) for w in WORKLOADS)}")
    cfg = _build(ExperimentConfig, {k: v for k, v in raw.items() if k not in sections})
    cfg.sections = {key: _coerce(raw.get(key, {}), cls, key) for key, cls in sections.items()}
    return cfg


def need(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Stop with a message naming the key, the value seen and what is allowed."""
    if not ok:
        raise ConfigError(f"config key '{key}': got {value!r}, allowed: {allowed}")


# The run folder is <output_dir>/<name>-<time>, and nodes key their saved state by its
# name: one plain path component.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MODULE_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def _check_ranges(cfg: ExperimentConfig) -> None:
    need(NAME_PATTERN.fullmatch(cfg.name) is not None, "name", cfg.name,
         "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (it names "
         "the run folder)")
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
    need(d.image_size >= 16, "data.image_size", d.image_size, ">= 16")
    need(1 <= d.max_objects <= 4, "data.max_objects", d.max_objects, "1 .. 4")
    need(d.alpha > 0, "data.alpha", d.alpha, "> 0")
    need(d.texture == "flat" or d.name == "synthetic", "data.texture", d.texture,
         "'flat' unless data.name is 'synthetic' (textures are painted into the scenes)")
    need(0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "0 < x < 1")
    lo = cfg.lora
    need(lo.rank >= 1, "lora.rank", lo.rank, ">= 1")
    need(lo.target_modules and all(MODULE_PATTERN.fullmatch(m) for m in lo.target_modules),
         "lora.target_modules", lo.target_modules,
         "a non-empty list of module names such as q_proj (dotted names allowed)")
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
    if cfg.strategy.secure_aggregation:
        _check_secure_aggregation(cfg)
    sp = cfg.split
    need(sp.steps_per_round is None or sp.steps_per_round >= 1, "split.steps_per_round",
         sp.steps_per_round, "null (local_epochs over the data) or an integer >= 1")
    need(sp.client_timeout_s > 0, "split.client_timeout_s", sp.client_timeout_s, "> 0 seconds")
    need(0 < sp.poll_interval_s <= 1, "split.poll_interval_s", sp.poll_interval_s,
         "0 < x <= 1 seconds")
    if sp.mode != "off":
        splittable = [w for w in WORKLOADS if room(w, "config").SPLIT]
        need(cfg.workload in splittable, "split.mode", sp.mode,
             f"'off' for workload {cfg.workload!r} (only {', '.join(splittable)} "
             f"{'has' if len(splittable) == 1 else 'have'} a U-shaped split)")
        need(not lo.client_ranks, "split.mode", sp.mode,
             "'off' when lora.client_ranks is set (the server half has one rank)")
    pr = cfg.privacy
    dp = pr.dp
    if dp.mode == "central":
        _check_central_dp(cfg)
    if dp.mode != "off":
        need((dp.epsilon is None) != (dp.noise_multiplier is None), "privacy.dp.epsilon",
             dp.epsilon, "exactly one of privacy.dp.epsilon and privacy.dp.noise_multiplier "
             f"(noise_multiplier is {dp.noise_multiplier!r})")
        need(dp.epsilon is None or dp.epsilon > 0, "privacy.dp.epsilon", dp.epsilon,
             "> 0 (smaller is more private)")
        need(dp.noise_multiplier is None or dp.noise_multiplier > 0,
             "privacy.dp.noise_multiplier", dp.noise_multiplier, "> 0")
        need(0 < dp.delta < 1, "privacy.dp.delta", dp.delta,
             "0 < x < 1, well below 1 / the examples per client (e.g. 1e-5)")
        need(dp.max_grad_norm > 0, "privacy.dp.max_grad_norm", dp.max_grad_norm, "> 0")
        need(dp.max_epsilon is None or dp.max_epsilon > 0, "privacy.dp.max_epsilon",
             dp.max_epsilon, "null (no budget) or > 0")
        need(sp.mode == "off", "privacy.dp.mode", dp.mode,
             "'off' for split training (DP across the split is not built; use "
             "privacy.split_defence there)")
    if dp.mode == "local":
        need(cfg.train.amp == "none", "privacy.dp.mode", dp.mode,
             "'off' with train.amp (Opacus' per-example gradients are not built for "
             "mixed precision here); set train.amp=none")
        need(cfg.strategy.proximal_mu == 0, "privacy.dp.mode", dp.mode,
             "'off' with strategy.proximal_mu > 0 (the proximal term would bypass the "
             "per-example clipping); set strategy.proximal_mu=0")
    need(pr.label_leakage.max_examples >= 10, "privacy.label_leakage.max_examples",
         pr.label_leakage.max_examples, ">= 10")
    need(pr.split_defence.gradient_noise_std >= 0, "privacy.split_defence.gradient_noise_std",
         pr.split_defence.gradient_noise_std, ">= 0")
    eps = pr.split_defence.label_epsilon
    need(eps is None or eps > 0, "privacy.split_defence.label_epsilon", eps,
         "null (off) or > 0 (smaller is more private)")
    for key, on in (("label_leakage.audit", pr.label_leakage.audit),
                    ("split_defence.gradient_noise_std", pr.split_defence.gradient_noise_std > 0),
                    ("split_defence.label_epsilon", eps is not None)):
        value = getattr(getattr(pr, key.split(".")[0]), key.split(".")[1])
        need(not on or sp.mode != "off", f"privacy.{key}", value,
             "its default unless split.mode is 'sequential' or 'parallel' (only split "
             "training sends gradients to the server)")
    st = cfg.strategy
    need(st.proximal_mu >= 0, "strategy.proximal_mu", st.proximal_mu, ">= 0")
    need(st.proximal_mu == 0 or st.name == "fedprox", "strategy.proximal_mu", st.proximal_mu,
         "0 unless strategy.name is 'fedprox'")
    s = cfg.simulation
    need(s.num_cpus_per_client > 0, "simulation.num_cpus_per_client",
         s.num_cpus_per_client, "> 0 (and at most the machine's cores)")
    need(s.num_gpus_per_client >= 0, "simulation.num_gpus_per_client",
         s.num_gpus_per_client, ">= 0")
    need(s.dispatch_interval_s is None or 0 < s.dispatch_interval_s <= 1,
         "simulation.dispatch_interval_s", s.dispatch_interval_s,
         "0 < x <= 1 seconds, or null for Flower's own 0.1 s tick")
    need(s.ray_address is None or re.fullmatch(r"auto|[\w.\-]+:\d{1,5}", s.ray_address)
         is not None, "simulation.ray_address", s.ray_address,
         "HOST:PORT of a running Ray head (e.g. 10.0.0.5:6379), 'auto', or null")
    room(cfg.workload, "config").check(cfg)  # its section, its strategies, its data
    if d.name in ("cifar10", "stl10"):
        need(d.root is not None, "data.root", d.root,
             f"a local folder holding {d.name} (nothing is downloaded)")


# Strategies Flower's DP wrappers cannot wrap, and why: the noise they add (sigma * C / n
# on the mean of n clipped updates) bounds a mean, and these aggregates are not one.
CENTRAL_DP_REFUSED = {
    "svd_lora": "its re-factorised aggregate (an SVD of the summed products B A) is not "
                "a mean of the clients' updates",
    "fedmedian_lora": "a coordinate-wise median is not a mean of the clients' updates",
    "trimmed_avg_lora": "a trimmed mean drops clients by value, so one client can move it "
                        "by more than C / n",
    "krum_lora": "Krum selects one client's update instead of averaging them",
}


def _check_central_dp(cfg: ExperimentConfig) -> None:
    dp, name = cfg.privacy.dp, cfg.strategy.name
    need(name not in CENTRAL_DP_REFUSED, "strategy.name", name,
         f"a strategy Flower's DP wrappers can wrap for privacy.dp.mode=central "
         f"(fedavg_lora, ffa_lora, fedavg, fedprox): {CENTRAL_DP_REFUSED.get(name)}")
    need(dp.noise_multiplier is not None and dp.epsilon is None, "privacy.dp.epsilon",
         dp.epsilon, "null with privacy.dp.mode=central: give privacy.dp.noise_multiplier "
         "(Flower's RDP accountant reports the epsilon spent)")
    need(dp.max_epsilon is None, "privacy.dp.max_epsilon", dp.max_epsilon,
         "null with privacy.dp.mode=central (budgets are for mode local so far)")
    need(cfg.fraction_train == 1, "fraction_train", cfg.fraction_train,
         "1 with privacy.dp.mode=central (the accountant assumes every client in every "
         "round: no sampling amplification)")


# Strategies SecAgg+ can carry: their aggregate is the weighted mean it computes.
SECAGG_STRATEGIES = ("fedavg_lora", "ffa_lora", "fedavg", "fedprox")


def _check_secure_aggregation(cfg: ExperimentConfig) -> None:
    st = cfg.strategy
    need(st.name in SECAGG_STRATEGIES, "strategy.secure_aggregation", True,
         f"false with strategy.name={st.name!r}: SecAgg+ yields only the weighted mean, and "
         f"{st.name} needs each client's update; use one of {', '.join(SECAGG_STRATEGIES)}")
    need(cfg.split.mode == "off", "strategy.secure_aggregation", True,
         "false with split training (its activations and gradients are per client by "
         "design); set split.mode=off")
    need(cfg.privacy.dp.mode != "central", "strategy.secure_aggregation", True,
         "false with privacy.dp.mode=central (Flower's DP wrappers clip or noise each "
         "update on the server, which then sees none); use privacy.dp.mode=local")
    need(st.max_update_bytes is None, "strategy.secure_aggregation", True,
         "false with strategy.max_update_bytes (the server cannot size a masked update); "
         "set strategy.max_update_bytes=null")
    need(cfg.min_train_clients >= 2, "min_train_clients", cfg.min_train_clients,
         ">= 2 with strategy.secure_aggregation (a sum of one update is that update)")


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
    cfg = _build_experiment(raw)
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
