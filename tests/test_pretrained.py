"""The pre-trained weights cache: trained once, then loaded; files made for other
settings, of another kind or not ours refused with the fix; atomic writes; and the
public split that the tosc teacher, the taco codec and the diffusion DDPM share.
Tiny dummy payloads stand in for the weights: nothing here trains a model."""

import os

import pytest
import torch

from common.config import ConfigError, load_config
from common.data import load_partition
from models import pretrained
from models.diffusion import pretrain as diffusion_pretrain
from models.taco import codec as taco_codec
from models.tosc import teacher as tosc_teacher

KEY = "distill.teacher.checkpoint"
HINT = "The server trains it before round 1 (python -m simulation)."
FINGERPRINT = {"teacher": {"hidden": 64, "lr": 0.01}, "seed": 0, "data": {"texture": "flat"}}


class Trainer:
    """A train_fn that counts its calls and returns a few-element state dict."""

    def __init__(self, scale: float = 1.0):
        self.calls, self.scale = 0, scale

    def __call__(self) -> dict:
        self.calls += 1
        return {"state_dict": {"w": self.scale * torch.arange(6.0).reshape(2, 3),
                               "step": torch.tensor([3, -1])},
                "info": {"train_seconds": 0.5, "losses": [0.9, 0.4]}}


def ensure(path, train_fn, kind="tosc-teacher", fingerprint=FINGERPRINT):
    return pretrained.ensure(path, kind, fingerprint, KEY, train_fn, log=lambda _: None)


def load(path, kind="tosc-teacher", fingerprint=FINGERPRINT):
    return pretrained.load(path, kind, fingerprint, KEY, HINT)


def assert_same_payload(a: dict, b: dict):
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["info"] == b["info"]


# ----------------------------------------------------------------------------- the cache


def test_weights_are_trained_once_then_loaded_without_training_again(tmp_path):
    path, train = tmp_path / "teacher.pt", Trainer()
    ensure(path, train)
    ensure(path, train)
    load(path)
    assert train.calls == 1


def test_the_loaded_payload_equals_the_trained_one(tmp_path):
    path = tmp_path / "teacher.pt"
    trained = ensure(path, Trainer())
    assert_same_payload(load(path), trained)
    assert_same_payload(ensure(path, Trainer(scale=2.0)), trained)  # the file's, not retrained


def test_a_file_rewritten_in_place_is_read_again_not_served_from_the_cache(tmp_path):
    path = tmp_path / "teacher.pt"
    ensure(path, Trainer())
    before = path.stat().st_mtime_ns
    load(path)  # now cached
    path.unlink()
    ensure(path, Trainer(scale=2.0))
    os.utime(path, ns=(before + 10**9, before + 10**9))  # a distinct mtime on any filesystem
    assert torch.equal(load(path)["state_dict"]["w"], 2.0 * torch.arange(6.0).reshape(2, 3))


def test_a_missing_file_names_the_key_the_path_and_what_to_do(tmp_path):
    path = tmp_path / "no" / "teacher.pt"
    with pytest.raises(FileNotFoundError) as err:
        load(path)
    assert KEY in str(err.value) and str(path) in str(err.value)
    assert "python -m simulation" in str(err.value)


def test_a_file_for_other_settings_is_refused_naming_the_dotted_keys_and_both_values(tmp_path):
    path, train = tmp_path / "teacher.pt", Trainer()
    ensure(path, train)
    other = {**FINGERPRINT, "teacher": {"hidden": 128, "lr": 0.01}, "data": {"texture": "textured"}}
    for refuse in (lambda: load(path, fingerprint=other),
                   lambda: ensure(path, train, fingerprint=other)):
        with pytest.raises(ValueError) as err:
            refuse()
        message = str(err.value)
        assert "teacher.hidden: file 64, config 128" in message
        assert 'data.texture: file "flat", config "textured"' in message
        assert "lr" not in message and "seed" not in message  # only what differs
        assert f"Delete it to retrain, or set {KEY} to a new file" in message
    assert train.calls == 1  # refused, not silently retrained over


def test_a_key_present_on_one_side_only_is_named_as_absent(tmp_path):
    path = tmp_path / "teacher.pt"
    ensure(path, Trainer())
    with pytest.raises(ValueError, match='data.max_objects: file absent, config 3'):
        load(path, fingerprint={**FINGERPRINT, "data": {"texture": "flat", "max_objects": 3}})


def test_a_file_of_another_kind_is_refused_naming_both_kinds(tmp_path):
    path = tmp_path / "codec.pt"
    ensure(path, Trainer(), kind="taco-codec")
    with pytest.raises(ValueError) as err:
        load(path, kind="tosc-teacher")
    assert "holds a taco-codec, not a tosc-teacher" in str(err.value)
    assert str(path) in str(err.value) and KEY in str(err.value)


@pytest.mark.parametrize("content", [os.urandom(256), b"teacher weights, honest\n"],
                         ids=["random bytes", "a text file"])
def test_a_file_torch_cannot_load_is_refused_as_not_ours(tmp_path, content):
    path = tmp_path / "teacher.pt"
    path.write_bytes(content)
    for refuse in (lambda: load(path), lambda: ensure(path, Trainer())):
        with pytest.raises(ValueError) as err:
            refuse()
        message = str(err.value)
        assert f"{path} is not a tosc-teacher file: torch cannot load it" in message
        assert f"Set {KEY} to a new file to train one there" in message
        assert "weights_only=False" not in message  # torch's advice would run the file's code
        assert err.value.__cause__ is None and err.value.__suppress_context__


@pytest.mark.parametrize("saved, held", [
    ({"state_dict": {"w": torch.zeros(2)}}, "a dict of ['state_dict']"),
    ({"kind": "tosc-teacher", "fingerprint": "not json", "payload": {}}, "a dict of"),
    (torch.zeros(3), "a Tensor"),
], ids=["a state dict alone", "a fingerprint that is not JSON", "a bare tensor"])
def test_a_torch_file_without_a_fingerprint_is_refused_as_not_ours(tmp_path, saved, held):
    path = tmp_path / "teacher.pt"
    torch.save(saved, path)
    with pytest.raises(ValueError) as err:
        load(path)
    assert f"{path} holds {held}" in str(err.value)
    assert "it is not a tosc-teacher file" in str(err.value)
    assert f"Set {KEY} to a new file to train one there" in str(err.value)


def test_the_file_records_its_kind_and_fingerprint_beside_the_payload(tmp_path):
    path = tmp_path / "teacher.pt"
    ensure(path, Trainer())
    saved = torch.load(path, weights_only=True)
    assert saved.keys() == {"kind", "fingerprint", "payload"}
    assert saved["kind"] == "tosc-teacher"
    assert saved["fingerprint"] == ('{"data": {"texture": "flat"}, "seed": 0, '
                                    '"teacher": {"hidden": 64, "lr": 0.01}}')  # sorted keys


def test_the_atomic_write_leaves_no_temp_file_behind(tmp_path):
    path = tmp_path / "nested" / "teacher.pt"
    ensure(path, Trainer())
    assert list(path.parent.iterdir()) == [path]


def test_a_training_that_raises_leaves_no_file_so_the_next_call_trains_again(tmp_path):
    path, train = tmp_path / "teacher.pt", Trainer()

    def crashes():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        ensure(path, crashes)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    ensure(path, train)
    assert train.calls == 1


def test_a_crash_while_writing_leaves_neither_half_a_file_nor_a_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "teacher.pt"

    def half_save(obj, f):
        open(f, "wb").write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(pretrained.torch, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        ensure(path, Trainer())
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- public split


def workload_cfgs(*data):
    """The three pre-training workloads on the same data settings."""
    return {"tosc": load_config("configs/distill_quickstart.yaml", list(data)),
            "taco": load_config("configs/taco_quickstart.yaml", list(data)),
            "diffusion": load_config("configs/diffusion_quickstart.yaml", list(data))}


def test_the_public_split_lies_past_every_clients_range():
    cfg = load_config("configs/distill_quickstart.yaml",
                      ["num_clients=3", "data.num_samples=60", "data.image_size=16",
                       "data.partitioner=iid"])
    public = pretrained.public_split(cfg.data, 16, "distill.teacher.public_samples")
    assert list(public.indices) == list(range(60, 76))  # the indices every result used
    owned = set()
    for cid in range(cfg.num_clients):
        for part in load_partition(cfg.data, cid, cfg.num_clients):
            owned |= set(part.indices.tolist())
    assert owned and max(owned) < cfg.data.num_samples
    assert owned.isdisjoint(public.indices.tolist())
    for split in (tosc_teacher.public_split, taco_codec.public_split,
                  diffusion_pretrain.public_split):
        assert split(cfg).indices[0] == cfg.data.num_samples


def test_a_real_sources_public_split_is_disjoint_from_the_clients_and_checked_for_room():
    digits = ["num_clients=3", "data.name=digits", "data.num_samples=1500",
              "data.image_size=16", "data.partitioner=iid"]
    cfg = load_config("configs/distill_quickstart.yaml", digits)
    public = tosc_teacher.public_split(load_config(
        "configs/distill_quickstart.yaml", [*digits, "distill.teacher.public_samples=200"]))
    owned = set()
    for cid in range(cfg.num_clients):
        for part in load_partition(cfg.data, cid, cfg.num_clients):
            owned |= set(part.indices.tolist())
    assert len(owned) == 1500 and len(public) == 200
    assert owned.isdisjoint(public.indices.tolist())
    assert set(public.tensors["label"].tolist()) == set(range(10))  # a seeded order, not sorted
    with pytest.raises(ConfigError, match=r"digits.*1797 examples.*distill.teacher"
                       r".public_samples=2000: lower data.num_samples to 0"):
        tosc_teacher.public_split(cfg)  # 297 left for the default 2000


def test_the_three_workloads_fingerprints_share_the_same_data_part_with_texture():
    data = ["data.num_samples=500", "data.image_size=32", "data.seed=3", "data.max_objects=2"]
    parts = {}
    for texture in ("flat", "textured"):
        cfgs = workload_cfgs(*data, f"data.texture={texture}")
        parts[texture] = [tosc_teacher.teacher_fingerprint(cfgs["tosc"])["data"],
                          taco_codec.codec_fingerprint(cfgs["taco"])["data"],
                          diffusion_pretrain.fingerprint(cfgs["diffusion"])["data"]]
        assert parts[texture] == [pretrained.public_data_fingerprint(cfgs["tosc"].data)] * 3
    assert parts["flat"][0] == {"seed": 3, "image_size": 32, "max_objects": 2,
                                "texture": "flat", "public_first_index": 500}
    # A teacher trained on textured scenes is not accepted for flat ones.
    assert parts["flat"][0] != parts["textured"][0]
