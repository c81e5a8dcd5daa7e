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
    cfg = load_config(QUICKSTART, ["rounds=7", "data.alpha=0.1", "channel.kind=rician",
                                   "model.tasks=[classification]"])
    assert cfg.rounds == 7 and cfg.data.alpha == 0.1 and cfg.channel.kind == "rician"
    assert cfg.model.tasks == ["classification"]
    # Flower's --run-config passes the overrides as one space-separated string.
    assert load_config(QUICKSTART, "rounds=2 lora.rank=4").lora.rank == 4


@pytest.mark.parametrize("override, words", [
    ("dat.alpha=1", ["unknown config key 'dat'", "data"]),
    ("data.alpah=1", ["unknown config key 'data.alpah'", "alpha"]),
    ("channel.kind=fm", ["'channel.kind'", "'fm'", "'awgn'", "'rician'"]),
    ("rounds=zero", ["'rounds'", "'zero'", "int"]),
    ("rounds=0", ["'rounds'", "0", ">= 1"]),
    ("data.alpha=-1", ["'data.alpha'", "-1", "> 0"]),
    ("model.tasks=[translation]", ["'model.tasks'", "translation", "captioning"]),
    ("lora.client_ranks=[4,8]", ["'lora.client_ranks'", "svd_lora"]),
    ("data.name=cifar10", ["'model.tasks'", "cifar10"]),
    ("fraction_train=1.5", ["'fraction_train'", "1.5"]),
    ("device=tpu", ["'device'", "'tpu'", "cuda"]),
])
def test_bad_values_name_the_key_the_value_and_the_fix(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    for w in words:
        assert w in str(err.value)


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
