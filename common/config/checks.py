"""The checks a config passes after it is read: ranges, and the keys that constrain
each other (a strategy with the privacy mode, split training with the workload).

Each failure names the key, the value seen, what is allowed and, where there is one,
the fix (`need`). The workload's own section is checked by its `config.check`, found
through the registry (common/workloads.py). Which strategies central DP and SecAgg+
accept is decided here from the strategy names of schema.py.
"""

from __future__ import annotations

import re
from typing import Any

from common.config.schema import (
    STRATEGY_NAMES,
    TASKS,
    TRACKERS,
    ConfigError,
    ExperimentConfig,
)
from common.workloads import WORKLOADS, workload_module


def need(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Stop with a message naming the key, the value seen and what is allowed."""
    if not ok:
        raise ConfigError(f"config key '{key}': got {value!r}, allowed: {allowed}")


# The run folder is <output_dir>/<name>-<time>, and nodes key their saved state by its
# name: one plain path component.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MODULE_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")

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
# The others aggregate by the weighted mean of the clients' updates: Flower's DP
# wrappers can wrap them, and SecAgg+ (which yields only that mean) can carry them.
MEAN_STRATEGIES = tuple(n for n in STRATEGY_NAMES if n not in CENTRAL_DP_REFUSED)


def check_experiment(cfg: ExperimentConfig) -> None:
    """Every check of a config read into dataclasses; the first failure raises."""
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
    unknown = [t for t in cfg.tracking if t not in TRACKERS]
    need(not unknown and len(set(cfg.tracking)) == len(cfg.tracking), "tracking", cfg.tracking,
         f"a list of distinct trackers drawn from {', '.join(TRACKERS)} ([] is off)")
    need(cfg.tracking_uri is None or "mlflow" in cfg.tracking, "tracking_uri", cfg.tracking_uri,
         "null unless tracking lists mlflow (the URI is MLflow's)")
    d = cfg.data
    need(d.num_samples >= 2 * cfg.num_clients, "data.num_samples", d.num_samples,
         f">= 2 * num_clients ({2 * cfg.num_clients})")
    need(d.image_size >= 16, "data.image_size", d.image_size, ">= 16")
    need(1 <= d.max_objects <= 4, "data.max_objects", d.max_objects, "1 .. 4")
    need(d.alpha > 0, "data.alpha", d.alpha, "> 0")
    need(d.texture == "flat" or d.name == "synthetic", "data.texture", d.texture,
         "'flat' unless data.name is 'synthetic' (textures are painted into the scenes)")
    need(d.questions == "scene" or d.name == "synthetic", "data.questions", d.questions,
         "'scene' unless data.name is 'synthetic' (the knowledge questions ask about the "
         "scenes' coloured shapes)")
    need(0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "0 < x < 1")
    need(d.classes_per_partition >= 1, "data.classes_per_partition", d.classes_per_partition,
         ">= 1")
    need(d.shards_per_partition >= 1, "data.shards_per_partition", d.shards_per_partition,
         ">= 1")
    need(d.seg_classes is None or d.seg_classes >= 2, "data.seg_classes", d.seg_classes,
         ">= 2 (background and one class), or null to count them from the masks")
    need(d.name != "hf" or d.hf_dataset is not None, "data.hf_dataset", d.hf_dataset,
         "a builder (imagefolder, parquet, csv, json) with data.root or data.data_files, "
         "or a hub dataset with data.allow_hub=true, for data.name=hf")
    need(d.partitioner != "natural_id" or d.name in ("photos", "hf"), "data.partitioner",
         d.partitioner, "natural_id only for sources that name each example's owner: "
         "photos (the photograph a patch is cut from) or hf with data.natural_id_column")
    need(d.partitioner != "natural_id" or d.name != "hf" or d.natural_id_column is not None,
         "data.natural_id_column", d.natural_id_column,
         "the column that names each example's owner, for data.partitioner=natural_id")
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
    for key, channel in (("channel", c), ("split.downlink", cfg.split.downlink)):
        _check_channel(key, channel)
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
        splittable = [w for w in WORKLOADS if workload_module(w, "config").SPLIT]
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
    workload_module(cfg.workload, "config").check(cfg)  # its section, its strategies, its data
    if d.name in ("cifar10", "stl10", "folder"):
        what = "an image folder, one sub-folder per class" if d.name == "folder" else \
            f"a local folder holding {d.name} (nothing is downloaded)"
        need(d.root is not None, "data.root", d.root, what)


def _check_central_dp(cfg: ExperimentConfig) -> None:
    dp, name = cfg.privacy.dp, cfg.strategy.name
    need(name not in CENTRAL_DP_REFUSED, "strategy.name", name,
         f"a strategy Flower's DP wrappers can wrap for privacy.dp.mode=central "
         f"({', '.join(MEAN_STRATEGIES)}): {CENTRAL_DP_REFUSED.get(name)}")
    need(dp.noise_multiplier is not None and dp.epsilon is None, "privacy.dp.epsilon",
         dp.epsilon, "null with privacy.dp.mode=central: give privacy.dp.noise_multiplier "
         "(Flower's RDP accountant reports the epsilon spent)")
    need(dp.max_epsilon is None, "privacy.dp.max_epsilon", dp.max_epsilon,
         "null with privacy.dp.mode=central (budgets are for mode local so far)")
    need(cfg.fraction_train == 1, "fraction_train", cfg.fraction_train,
         "1 with privacy.dp.mode=central (the accountant assumes every client in every "
         "round: no sampling amplification)")


def _check_secure_aggregation(cfg: ExperimentConfig) -> None:
    st = cfg.strategy
    need(st.name in MEAN_STRATEGIES, "strategy.secure_aggregation", True,
         f"false with strategy.name={st.name!r}: SecAgg+ yields only the weighted mean, and "
         f"{st.name} needs each client's update; use one of {', '.join(MEAN_STRATEGIES)}")
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


def _check_channel(key: str, c) -> None:
    need(c.delay_spread_ns > 0, f"{key}.delay_spread_ns", c.delay_spread_ns,
         "> 0 nanoseconds (TR 38.901 lists 10 ns 'very short' to 1000 ns 'very long')")
    need(c.speed_mps >= 0, f"{key}.speed_mps", c.speed_mps, ">= 0 m/s")
    need(0.5 <= c.carrier_ghz <= 100, f"{key}.carrier_ghz", c.carrier_ghz,
         "0.5 .. 100 GHz (TR 38.901's range)")
    need(c.subcarrier_spacing_khz in (15, 30, 60, 120, 240), f"{key}.subcarrier_spacing_khz",
         c.subcarrier_spacing_khz, "one of 15, 30, 60, 120, 240 (5G NR numerologies)")
    need(c.fft_size >= 12, f"{key}.fft_size", c.fft_size, ">= 12 subcarriers")
