"""Config: typed loading, overrides, and errors that name key, value and what is allowed."""

import pytest

from common.config import ConfigError, ExperimentConfig, load_config, parse_overrides

QUICKSTART = "configs/quickstart.yaml"


def test_quickstart_loads_into_typed_dataclasses():
    cfg = load_config(QUICKSTART)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.num_clients == 10 and cfg.data.partitioner == "dirichlet"
    assert cfg.lora.alpha == 16.0 and isinstance(cfg.lora.alpha, float)  # int widened
    assert cfg.channel.snr_range_db == [0.0, 20.0]


def test_overrides_apply_dotted_keys_with_yaml_values():
    cfg = load_config(QUICKSTART, ["rounds=7", "data.alpha=0.1", "channel.model=tdl-d",
                                   "model.tasks=[classification]"])
    assert cfg.rounds == 7 and cfg.data.alpha == 0.1 and cfg.channel.model == "tdl-d"
    assert cfg.model.tasks == ["classification"]
    # Flower's --run-config passes the overrides as one space-separated string.
    assert load_config(QUICKSTART, "rounds=2 lora.rank=4").lora.rank == 4


@pytest.mark.parametrize("override, words", [
    ("dat.alpha=1", ["unknown config key 'dat'", "data"]),
    ("data.alpah=1", ["unknown config key 'data.alpah'", "alpha"]),
    ("channel.model=fm", ["'channel.model'", "'fm'", "'awgn'", "'tdl-e'"]),
    ("channel.kind=awgn", ["'channel.kind'", "is now channel.model"]),
    ("channel.fft_size=4", ["'channel.fft_size'", ">= 12"]),
    ("rounds=zero", ["'rounds'", "'zero'", "int"]),
    ("rounds=0", ["'rounds'", "0", ">= 1"]),
    ("data.alpha=-1", ["'data.alpha'", "-1", "> 0"]),
    ("model.tasks=[translation]", ["'model.tasks'", "translation", "captioning"]),
    ("lora.client_ranks=[4,8]", ["'lora.client_ranks'", "svd_lora"]),
    ("data.name=cifar10", ["'data.root'", "cifar10", "nothing is downloaded"]),
    ("fraction_train=1.5", ["'fraction_train'", "1.5"]),
    ("device=tpu", ["'device'", "'tpu'", "cuda"]),
])
def test_bad_values_name_the_key_the_value_and_the_fix(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    for w in words:
        assert w in str(err.value)


def test_text_tasks_are_allowed_on_any_source():
    """Whether a source has captions, questions and answers is the data layer's to say,
    when it is read (models/mtsc/model.py, data_needs), not the config's."""
    cfg = load_config(QUICKSTART, ["data.name=photos"])
    assert {"vqa", "captioning"} <= set(cfg.model.tasks)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["rounds"])


def test_every_shipped_config_is_valid():
    from pathlib import Path

    files = sorted(Path("configs").glob("*.yaml"))
    assert files, "configs/ should hold the experiment files"
    for f in files:
        load_config(f)


# The strategy names are spelled once in the config layer (common/config/schema.py), which
# cannot import the registry in strategies/ (Flower and torch load there). These tests
# hold the two, and every list drawn from the names, together.


def test_the_config_and_the_strategy_registry_name_the_same_strategies():
    import typing

    import strategies
    from common.config import LORA_STRATEGIES, STRATEGY_NAMES, WEIGHT_STRATEGIES, StrategyConfig

    assert set(strategies.STRATEGIES) == set(STRATEGY_NAMES)
    annotation = typing.get_type_hints(StrategyConfig)["name"]
    assert typing.get_args(annotation) == STRATEGY_NAMES  # what strategy.name accepts
    # The two families split the names: every strategy is of exactly one.
    assert not set(LORA_STRATEGIES) & set(WEIGHT_STRATEGIES)
    assert set(LORA_STRATEGIES) | set(WEIGHT_STRATEGIES) == set(STRATEGY_NAMES)


def test_the_strategy_families_are_what_the_registry_classes_are():
    import strategies
    from common.config import LORA_STRATEGIES, WEIGHT_STRATEGIES

    # Whole weights: FedAvg of the student (and FedProx, its subclass); LoRA adapters:
    # every other strategy, which aggregates the A and B factors.
    weights = {n for n, cls in strategies.STRATEGIES.items()
               if issubclass(cls, strategies.StudentFedAvg)}
    assert weights == set(WEIGHT_STRATEGIES)
    assert set(strategies.STRATEGIES) - weights == set(LORA_STRATEGIES)


def test_each_workload_accepts_only_registered_strategies_of_one_family():
    from common.config import LORA_STRATEGIES, STRATEGY_NAMES, WEIGHT_STRATEGIES
    from common.workloads import WORKLOADS, workload_module

    for name in WORKLOADS:
        accepted = workload_module(name, "config").STRATEGIES
        assert accepted and set(accepted) <= set(STRATEGY_NAMES), name
        assert set(accepted) <= set(LORA_STRATEGIES) or set(accepted) <= set(WEIGHT_STRATEGIES)


def test_central_dp_and_secure_aggregation_take_exactly_the_strategies_that_average():
    from flwr.serverapp.strategy import FedAvg

    import strategies
    from common.config import CENTRAL_DP_REFUSED, MEAN_STRATEGIES, STRATEGY_NAMES

    assert set(CENTRAL_DP_REFUSED) <= set(STRATEGY_NAMES)
    assert set(MEAN_STRATEGIES) == set(STRATEGY_NAMES) - set(CENTRAL_DP_REFUSED)

    def averages(cls: type) -> bool:
        # FedAvgLoRA's per-reply checks, then Flower's FedAvg.aggregate_train: the
        # weighted mean that DP noise bounds and SecAgg+ computes.
        return (cls._aggregate_accepted is strategies.FedAvgLoRA._aggregate_accepted
                and super(strategies.FedAvgLoRA, cls).aggregate_train is FedAvg.aggregate_train)

    assert {n for n, cls in strategies.STRATEGIES.items() if averages(cls)} == set(MEAN_STRATEGIES)


def test_an_unknown_strategy_name_is_refused_with_the_valid_names():
    from common.config import STRATEGY_NAMES

    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, ["strategy.name=fedsgd"])
    message = str(err.value)
    assert "'strategy.name'" in message and "'fedsgd'" in message
    for name in STRATEGY_NAMES:
        assert repr(name) in message
