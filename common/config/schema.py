"""What an experiment config holds: the engine's sections as typed dataclasses, the
tasks the scenes annotate, and the strategy names.

The engine's sections are data, lora, channel, train, strategy, split, privacy and
simulation. A workload's own section (`model` for mtsc, `distill` for tosc) is a
dataclass in its workload's `config.py`, found through the registry
(common/workloads.py); `workload_sections` lives here because `ExperimentConfig` builds
its defaults from it. The strategy names are spelled here once, by family, because
the registry in `strategies/` imports Flower and torch and a config is checked before
either loads (tests/test_config.py checks that the two agree).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from common.workloads import WORKLOADS, workload_module

# The tasks the synthetic scenes annotate (a label, a question with its answer, a
# caption, the image itself); `train.loss_weights` weights them.
TASKS = ("classification", "vqa", "captioning", "reconstruction")
# Where a run's metrics may also be logged (common/tracking.py), besides metrics.json.
TRACKERS = ("tensorboard", "mlflow")

# Strategies that aggregate LoRA adapters (the A and B factors a client shares), for
# workloads that fine-tune a frozen model with LoRA.
LoraStrategy = Literal["fedavg_lora", "ffa_lora", "svd_lora", "fedmedian_lora",
                       "trimmed_avg_lora", "krum_lora"]
# Strategies that average whole weights (FedAvg, FedProx), for workloads that share
# a model's own weights.
WeightStrategy = Literal["fedavg", "fedprox"]
StrategyName = Literal[LoraStrategy, WeightStrategy]
LORA_STRATEGIES: tuple[str, ...] = typing.get_args(LoraStrategy)
WEIGHT_STRATEGIES: tuple[str, ...] = typing.get_args(WeightStrategy)
STRATEGY_NAMES: tuple[str, ...] = typing.get_args(StrategyName)


ChannelModel = Literal["none", "awgn", "rayleigh", "tdl-a", "tdl-b", "tdl-c", "tdl-d", "tdl-e"]
CHANNEL_MODELS: tuple[str, ...] = typing.get_args(ChannelModel)
# Keys renamed since earlier configs, with what to write now.
RENAMED_KEYS = {
    "channel.kind": "channel.model (none | awgn | rayleigh | tdl-a .. tdl-e)",
    "channel.rician_k": "channel.model: tdl-d or tdl-e (TDL models with a line-of-sight path)",
    "split.downlink.kind": "split.downlink.model",
    "split.downlink.rician_k": "split.downlink.model: tdl-d or tdl-e",
    "taco.link.modulations": "taco.link.mcs ('auto' or a row of models.digital_phy.MCS_TABLE)",
    "taco.link.codes": "taco.link.mcs (5G LDPC at the MCS row's code rate)",
}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


DataSource = Literal["synthetic", "folder", "hf", "photos", "digits", "cifar10", "stl10"]
DATA_SOURCES: tuple[str, ...] = typing.get_args(DataSource)
Partitioner = Literal["iid", "dirichlet", "pathological", "shard", "natural_id"]


@dataclass
class DataConfig:
    """Where the examples come from (common/data): the synthetic scenes, a user's image
    folder or Hugging Face dataset, or a bundled real source; and how they are shared
    among the clients."""

    name: DataSource = "synthetic"
    # folder: the image folder (one sub-folder per class); cifar10 / stl10: the folder
    # holding the extracted archive; hf: the data_dir of a local builder.
    root: str | None = None
    download: bool = False  # fetch CIFAR-10 / STL-10 into `root` (needs internet); off by default
    # Examples the clients share: synthetic scenes 0 .. num_samples-1, or the first
    # num_samples of a real source in a seeded order (all of it when it has fewer). The
    # examples after them are the public split (workloads that pre-train centrally) and
    # then the held-out examples a membership audit draws from.
    num_samples: int = 3000
    image_size: int = 32
    max_objects: int = 3
    # Synthetic scenes only. "flat": uniform shapes on a dark background (the
    # default); "textured": a smooth coloured background with grain and striped
    # objects, hard enough that image codecs pay for detail (labels stay true).
    texture: Literal["flat", "textured"] = "flat"
    # Synthetic scenes only. "scene": questions about the image (the default);
    # "knowledge": "what does the red circle mean", answered from a fact table and not
    # from the image (common/data/facts.py; mtsc's retrieval reads it, model.rag_k).
    questions: Literal["scene", "knowledge"] = "scene"
    seed: int = 0
    partitioner: Partitioner = "dirichlet"
    alpha: float = 0.5  # Dirichlet concentration; smaller is more heterogeneous
    classes_per_partition: int = 2  # pathological: the classes each partition holds
    shards_per_partition: int = 2  # shard: label-sorted shards per partition
    test_fraction: float = 0.2  # share of each client's partition held out locally
    # hf: the dataset (a local builder: imagefolder, parquet, csv, json; or a hub name,
    # which needs the network and allow_hub), its files, split and subset.
    hf_dataset: str | None = None
    data_files: list[str] = field(default_factory=list)
    hf_split: str = "train"
    hf_subset: str | None = None
    allow_hub: bool = False
    # folder: masks mirroring `root` (one PNG of class ids per image, same stem).
    masks_root: str | None = None
    seg_classes: int | None = None  # segmentation classes; None: the largest id + 1
    # The names of mask ids 1, 2, ... (default "class 1", ...). Equal to the source's
    # class names, they also say that mask id k is label k - 1 (the synthetic scenes' way).
    seg_class_names: list[str] = field(default_factory=list)
    # Column (hf) or metadata.jsonl field (folder) of each annotation.
    image_column: str = "image"
    label_column: str = "label"
    mask_column: str = "mask"
    caption_column: str = "caption"
    question_column: str = "question"
    answer_column: str = "answer"
    natural_id_column: str | None = None  # hf: who owns each example (natural_id)


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
    """The wireless channel (Sionna's PHY, models/channel.py): AWGN, Rayleigh block
    fading, or a 3GPP TR 38.901 tapped-delay-line model on an OFDM grid (TDL-D and
    TDL-E have a line-of-sight path)."""

    model: ChannelModel = "awgn"
    snr_db: float = 10.0  # Es/N0 per complex symbol
    snr_range_db: list[float] | None = None  # [low, high]: SNR sampled per example
    sweep_snr_db: list[float] = field(default_factory=list)  # dB; evaluated at each after the last round
    # The TDL models only.
    delay_spread_ns: float = 100.0  # RMS delay spread
    speed_mps: float = 0.0  # terminal speed: the Doppler over an example's slots
    carrier_ghz: float = 3.5
    subcarrier_spacing_khz: float = 30.0
    fft_size: int = 64  # subcarriers of the OFDM grid
    csi: Literal["perfect", "ls"] = "perfect"  # what the receiver equalises with


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
    name: StrategyName = "fedavg_lora"
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
    downlink: ChannelConfig = field(default_factory=lambda: ChannelConfig(model="none"))
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
    # Each client process builds a workload's model once and resets it for every
    # message (fl_client/model_cache.py): the same numbers; false builds one per message.
    reuse_models: bool = True
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
    # Trackers the run also logs to, drawn from TRACKERS (common/tracking.py); [] is off.
    tracking: list[str] = field(default_factory=list)
    # MLflow's tracking URI; None: sqlite:///<output_dir>/mlflow.db, one store for every
    # run of that output folder.
    tracking_uri: str | None = None
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


def workload_sections() -> dict[str, type]:
    """Each registered workload's config section class, by its top-level key."""
    out: dict[str, type] = {}
    engine = {f.name for f in dataclasses.fields(ExperimentConfig)}
    for name in WORKLOADS:
        for key, cls in workload_module(name, "config").SECTIONS.items():
            if key in engine or key in out:
                raise TypeError(f"workload {name!r} declares config section {key!r}, "
                                "which another part of the config already has")
            out[key] = cls
    return out
