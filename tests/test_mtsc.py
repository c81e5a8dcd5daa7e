"""The mtsc workload behind the seam: what is shared, rank adaptation, learning."""


import numpy as np
import pytest
import torch

from common.config import load_config
from common.data import load_partition
from common.device import resolve_device
from models import get_workload
from models.mtsc import model as mtsc_model
from models.mtsc import workload as mtsc


def test_shared_state_is_lora_adapters_only(tiny_cfg):
    model = mtsc.build(tiny_cfg)
    shared = mtsc.shared_state(model)
    assert shared and all(".lora_A." in k or ".lora_B." in k for k in shared)
    # q_proj and v_proj of every attention block: encoder self-attn, decoder self- and
    # cross-attn, each with an A and a B.
    layers = tiny_cfg.model.layers
    assert len(shared) == 2 * 2 * (layers + 2 * layers)
    lora_params = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert len(lora_params) == len(shared)
    b_only = mtsc.shared_state(model, lora_train="b")
    assert set(b_only) == {k for k in shared if "lora_B" in k}


def test_every_party_builds_the_same_initial_model(tiny_cfg):
    a, b = mtsc.build(tiny_cfg), mtsc.build(tiny_cfg)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_load_shared_state_round_trips(tiny_cfg):
    src, dst = mtsc.build(tiny_cfg), mtsc.build(tiny_cfg)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "lora_" in n:
                p.normal_()
    mtsc.load_shared_state(dst, mtsc.shared_state(src))
    for k, v in mtsc.shared_state(src).items():
        np.testing.assert_array_equal(mtsc.shared_state(dst)[k], v)
    with pytest.raises(KeyError, match="does not"):
        mtsc.load_shared_state(dst, {"encoder.bogus.lora_A.weight": np.zeros((8, 4))})


def _product(model, key_a, scale):
    s = mtsc.shared_state(model)
    return scale * s[key_a.replace("lora_A", "lora_B")] @ s[key_a]


@pytest.mark.parametrize("local_rank", [4, 16])
def test_rank_adaptation_preserves_the_svd_update(tiny_cfg, local_rank):
    """svd_lora sends rank-R factors; a client of rank r keeps the best rank-r part."""
    big_r, alpha = 8, tiny_cfg.lora.alpha
    rng = np.random.default_rng(0)
    server = mtsc.build(tiny_cfg, lora_rank=big_r)
    arrays = {}
    for k, v in mtsc.shared_state(server).items():
        arrays[k] = rng.normal(size=v.shape).astype(np.float32)
    client = mtsc.build(tiny_cfg, lora_rank=local_rank)
    mtsc.load_shared_state(client, arrays)
    key = next(k for k in arrays if "lora_A" in k)
    b, a = arrays[key.replace("lora_A", "lora_B")].astype(np.float64), arrays[key].astype(np.float64)
    global_update = (alpha / big_r) * b @ a
    got = _product(client, key, alpha / local_rank)
    if local_rank >= big_r:
        np.testing.assert_allclose(got, global_update, atol=1e-5)
    else:
        expected = (alpha / big_r) * b[:, :local_rank] @ a[:local_rank]
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_local_training_learns_and_keeps_the_lam_frozen():
    cfg = load_config("configs/quickstart.yaml", [
        "data.num_samples=400", "data.partitioner=iid", "train.batch_size=16",
        "train.lr=0.005"])
    train, test = load_partition(cfg.data, 0, 1, cfg.model.caption_len)
    model = mtsc.build(cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = mtsc.evaluate(model, test, cfg)
    for epoch in range(3):
        metrics = mtsc.train_local(model, train, cfg, seed=epoch)
    after = mtsc.evaluate(model, test, cfg)
    assert after["loss"] < 0.8 * before["loss"]
    assert after["psnr"] > before["psnr"]
    assert metrics["num-examples"] == len(train)
    assert 0 < metrics["symbols_per_example"] <= (16 + 8) * cfg.model.jscc_symbols
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} should stay frozen"


def test_ffa_lora_keeps_a_at_its_seed(tiny_cfg):
    train, _ = load_partition(tiny_cfg.data, 0, 3, tiny_cfg.model.caption_len)
    model = mtsc.build(tiny_cfg)
    a_before = {k: v.copy() for k, v in mtsc.shared_state(model).items() if "lora_A" in k}
    mtsc.train_local(model, train, tiny_cfg, lora_train="b")
    after = mtsc.shared_state(model)
    for k, v in a_before.items():
        np.testing.assert_array_equal(after[k], v)
    assert any(np.abs(after[k]).sum() > 0 for k in after if "lora_B" in k)


def test_missing_checkpoint_is_a_clear_error(tmp_path, tiny_cfg):
    tiny_cfg.model.checkpoint = str(tmp_path / "no-such-lam")
    with pytest.raises(FileNotFoundError, match="no-such-lam"):
        mtsc.build(tiny_cfg)


def test_local_checkpoint_loads(tmp_path, tiny_cfg):
    lam = mtsc_model.build_lam(tiny_cfg)
    with torch.no_grad():
        lam.encoder.layers[0].fc1.weight.fill_(0.5)
    lam.save_pretrained(tmp_path / "lam")
    tiny_cfg.model.checkpoint = str(tmp_path / "lam")
    model = mtsc.build(tiny_cfg)
    w = model.transmitter.lam_encoder.layers[0].fc1.weight
    assert torch.all(w == 0.5)


def test_seam_and_device():
    wl = get_workload("mtsc")
    for fn in ("build", "shared_state", "load_shared_state", "train_local", "evaluate"):
        assert callable(getattr(wl, fn))
    with pytest.raises(ValueError, match="mtsc"):
        get_workload("nope")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_a_round_of_local_training_is_reproducible(tiny_cfg):
    train, test = load_partition(tiny_cfg.data, 2, 3, tiny_cfg.model.caption_len)
    runs = []
    for _ in range(2):
        model = mtsc.build(tiny_cfg)
        mtsc.train_local(model, train, tiny_cfg, seed=7)
        runs.append((mtsc.shared_state(model), mtsc.evaluate(model, test, tiny_cfg)))
    for k, v in runs[0][0].items():
        np.testing.assert_array_equal(runs[1][0][k], v)
    assert runs[0][1] == runs[1][1]
