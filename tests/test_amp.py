"""train.amp: mixed precision on CUDA only; a CPU node trains in fp32 (bit-identical to
amp=none) and logs that it did."""

import dataclasses
import logging

import pytest
import torch

from common.config import ConfigError, load_config
from common.data import load_partition
from models.mtsc import workload as mtsc


def trained_lora(cfg, device="cpu"):
    train, _ = load_partition(cfg.data, 0, 3, cfg.model.caption_len)
    model = mtsc.build(cfg, device)
    metrics = mtsc.train_local(model, train, cfg, seed=3)
    return mtsc.shared_state(model), metrics


def test_amp_on_cpu_falls_back_to_the_fp32_result(tiny_cfg, caplog):
    fp32, _ = trained_lora(tiny_cfg)
    bf16_cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, amp="bf16"))
    with caplog.at_level(logging.WARNING):
        fallback, _ = trained_lora(bf16_cfg)
    assert any("train.amp=bf16 needs CUDA" in r.getMessage() for r in caplog.records)
    for k in fp32:
        assert (fp32[k] == fallback[k]).all(), k


def test_amp_values_are_checked():
    with pytest.raises(ConfigError, match="train.amp"):
        load_config("configs/quickstart.yaml", ["train.amp=int8"])
    assert mtsc.autocast_dtype("none", torch.device("cuda")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cuda_trains_close_to_fp32(tiny_cfg, amp):
    fp32, m32 = trained_lora(tiny_cfg, "cuda")
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, amp=amp))
    mixed, m16 = trained_lora(cfg, "cuda")
    assert abs(m16["train_loss"] - m32["train_loss"]) < 0.05 * m32["train_loss"]
    assert any((fp32[k] != mixed[k]).any() for k in fp32)  # autocast did run
