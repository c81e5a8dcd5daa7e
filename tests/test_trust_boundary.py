"""The node's trust boundary (fl_client/trust.py): the server may steer training, never
the node's disk, network or device; names that become paths and arrays that reach the
model are checked, and a message that fails gets an error reply naming the value, with
nothing written and the node still serving."""

import logging
import os

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from common.config import config_from_dict, load_config
from fl_client import trust
from fl_client.client_app import app
from fl_client.node import PRIVATE_STATE
from fl_client.split_handlers import LIVE_STATE, PROGRESS
from fl_client.trust import NODE_KEYS, REFUSED, Refused, node_experiment, split_tensors
from fl_server.loop import initial_arrays
from models.mtsc import workload as mtsc
from models.split_wire import encode

RUN_KEY = "quickstart-20260101-120000"


@pytest.fixture(autouse=True)
def _messages(flower_message_context, monkeypatch):
    """Every test here builds Flower messages, and sees the node's warnings afresh (the
    node warns once per ignored value and process)."""
    monkeypatch.setattr(trust, "_warned", set())


def node_context(node_config=None, node_id=7):
    return Context(run_id=1, node_id=node_id, state=RecordDict(), run_config={},
                   node_config={"partition-id": 1, "num-partitions": 3, **(node_config or {})})


def message(cfg, arrays=None, message_type="train", experiment=None, **config):
    """A server message as the round loops build it; `config` entries replace or add
    ("run-key", "server-round", "lora-train"; None drops one)."""
    entries = {"experiment": cfg.to_json() if experiment is None else experiment,
               "run-key": RUN_KEY, "server-round": 1, "lora-train": "ab"}
    entries.update(config)
    content = RecordDict({"config": ConfigRecord({k: v for k, v in entries.items()
                                                  if v is not None})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, dst_node_id=7, message_type=message_type)


def listing(*roots):
    """Every path under `roots` (what a test compares before and after)."""
    out = set()
    for root in roots:
        for folder, dirs, files in os.walk(root):
            out.update(os.path.join(folder, n) for n in dirs + files)
    return out


def assert_refused(reply, *words):
    assert reply.has_error(), "the node acted on a message it should refuse"
    assert reply.error.code == REFUSED, reply.error.reason
    for w in words:
        assert w in reply.error.reason, (w, reply.error.reason)
    assert not reply.has_content()  # an error reply carries nothing else


def with_overrides(cfg, **overrides):
    return config_from_dict(cfg.to_dict(), overrides)


# --------------------------------------------------------------------------- 1. node-only keys


def test_paths_download_and_device_from_the_server_are_ignored(tiny_cfg, flower_message_context,
                                                               tmp_path, caplog):
    node_state = tmp_path / "node-state"
    sent = with_overrides(tiny_cfg, **{
        "client_state_dir": str(tmp_path / "server-chosen"),
        "data.root": str(tmp_path / "server-data"), "data.download": True,
        "device": "cuda:7", "distill.store_dir": str(tmp_path / "server-store"),
        "distill.teacher.checkpoint": str(tmp_path / "server-teacher.pt")})
    context = node_context({"state-dir": str(node_state)})
    with caplog.at_level(logging.WARNING, logger="fedsemcom"):
        reply = app(message(sent, initial_arrays(sent, "ab")), context)
    assert not reply.has_error(), reply.error
    cfg = node_experiment(message(sent), context)
    assert cfg.client_state_dir == str(node_state) and cfg.data.root is None
    assert cfg.data.download is False and cfg.device == "auto"
    assert cfg.distill.store_dir is None
    assert cfg.distill.teacher.checkpoint == "runs/teachers/teacher.pt"  # the node's default
    for key in ("client_state_dir", "data.root", "data.download", "device", "distill.store_dir",
                "distill.teacher.checkpoint"):
        assert f"ignoring {key}=" in caplog.text, key
    assert (node_state / RUN_KEY / "partition-1" / "round-1.npz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node-state"]  # nothing else


def test_without_a_node_state_dir_the_servers_client_state_dir_writes_nothing(
        tiny_cfg, flower_message_context, tmp_path):
    sent = with_overrides(tiny_cfg, client_state_dir=str(tmp_path / "server-chosen"))
    reply = app(message(sent, initial_arrays(sent, "ab")), node_context())
    assert not reply.has_error(), reply.error
    assert listing(tmp_path) == set()


def test_the_node_config_sets_the_node_only_keys(tiny_cfg, tmp_path):
    node = {"state-dir": "s", "data-root": "d", "data-download": "true", "device": "cpu",
            "model-checkpoint": "lam", "teacher-checkpoint": "t.pt", "teacher-store-dir": "o",
            "diffusion-checkpoint": "ddpm.pt", "diffusion-clip-checkpoint": "clip",
            "data-hf-dataset": "parquet", "data-files": "a.parquet, b.parquet",
            "data-masks-root": "m", "data-allow-hub": "false", "knowledge-base": "kb.npz",
            "knowledge-embedder": "emb", "transmitter-budget": "0.5"}
    assert set(node) == set(NODE_KEYS.values())
    # svd_lora: a node with a transmitter budget takes no other LoRA strategy.
    sent = config_from_dict(tiny_cfg.to_dict(), {"strategy.name": "svd_lora"})
    cfg = node_experiment(message(sent), node_context(node))
    assert (cfg.client_state_dir, cfg.data.root, cfg.data.download, cfg.device) == \
        ("s", "d", True, "cpu")
    assert (cfg.data.hf_dataset, cfg.data.data_files, cfg.data.masks_root,
            cfg.data.allow_hub) == ("parquet", ["a.parquet", "b.parquet"], "m", False)
    assert (cfg.model.checkpoint, cfg.distill.teacher.checkpoint, cfg.distill.store_dir,
            cfg.diffusion.checkpoint, cfg.diffusion.clip_checkpoint) == \
        ("lam", "t.pt", "o", "ddpm.pt", "clip")
    assert (cfg.model.knowledge_base, cfg.model.knowledge_embedder,
            cfg.model.transmitter_budget) == ("kb.npz", "emb", "0.5")


def test_a_server_that_asks_for_a_pretrained_lam_the_node_lacks_is_refused(
        tiny_cfg, flower_message_context, tmp_path):
    sent = with_overrides(tiny_cfg, **{"model.checkpoint": str(tmp_path / "lam")})
    reply = app(message(sent, initial_arrays(tiny_cfg, "ab")), node_context())
    assert_refused(reply, "model.checkpoint", str(tmp_path / "lam"), "model-checkpoint")
    # With its own copy the node uses that, whatever the server names.
    cfg = node_experiment(message(sent), node_context({"model-checkpoint": "/node/lam"}))
    assert cfg.model.checkpoint == "/node/lam"


def test_a_real_dataset_without_a_node_data_root_names_the_node_key(
        tiny_cfg, flower_message_context, tmp_path):
    raw = tiny_cfg.to_dict()
    raw["data"].update(name="cifar10", root=str(tmp_path / "cifar"))
    raw["model"]["tasks"] = ["classification", "reconstruction"]
    sent = config_from_dict(raw)
    reply = app(message(sent, initial_arrays(tiny_cfg, "ab")), node_context())
    assert_refused(reply, "data.root", "node config data-root")


# --------------------------------------------------------------------------- 2. names


@pytest.mark.parametrize("run_key", [
    "../../../tmp/escaped", "..", ".", "/etc/fedsemcom", "a/b", "a\\b", "c:x", "x\x00y",
    " padded", "x" * 129, 17])
def test_an_unsafe_run_key_is_refused_and_nothing_is_written(
        tiny_cfg, flower_message_context, tmp_path, run_key):
    state = tmp_path / "state" / "node-1"
    state.mkdir(parents=True)
    context = node_context({"state-dir": str(state)})
    before = listing(tmp_path)
    reply = app(message(tiny_cfg, initial_arrays(tiny_cfg, "ab"), **{"run-key": run_key}),
                context)
    assert_refused(reply, "run-key", repr(run_key)[:40])
    assert listing(tmp_path) == before
    assert PRIVATE_STATE not in context.state.array_records
    reply = app(message(tiny_cfg, initial_arrays(tiny_cfg, "ab"), message_type="evaluate"),
                context)
    assert not reply.has_error(), reply.error  # and it keeps serving


def test_a_run_key_that_resolves_outside_the_state_folder_is_refused(
        tiny_cfg, flower_message_context, tmp_path):
    state, outside = tmp_path / "state", tmp_path / "outside"
    state.mkdir()
    outside.mkdir()
    (state / "linked").symlink_to(outside)  # a name that is safe but leads out
    context = node_context({"state-dir": str(state)})
    reply = app(message(tiny_cfg, initial_arrays(tiny_cfg, "ab"), **{"run-key": "linked"}),
                context)
    assert_refused(reply, "run-key='linked'", "outside the node's state folder")
    assert listing(outside) == set()


@pytest.mark.parametrize("entry, value, words", [
    ("server-round", -1, ["server-round=-1"]),
    ("server-round", "../1", ["server-round='../1'"]),
    ("server-round", 10**9, ["server-round=1000000000"]),
    ("lora-train", "../a", ["lora-train='../a'"]),
    ("experiment", "{not json", ["not valid JSON"]),
    ("experiment", "[1, 2]", ["JSON mapping"]),
    ("experiment", '{"rounds": -3}', ["'rounds'", "-3"]),
    ("experiment", '{"data": "x"}', ["'data'"]),
    ("experiment", 5, ["JSON string"]),
    ("clipping_norm", float("nan"), ["clipping_norm=nan"]),
    ("clipping_norm", "1", ["clipping_norm='1'"]),
])
def test_malformed_config_entries_are_refused(tiny_cfg, flower_message_context, entry, value,
                                              words):
    reply = app(message(tiny_cfg, initial_arrays(tiny_cfg, "ab"), **{entry: value}),
                node_context())
    assert_refused(reply, *words)


def test_an_unknown_message_type_or_no_config_is_refused(tiny_cfg, flower_message_context):
    arrays = initial_arrays(tiny_cfg, "ab")
    assert_refused(app(message(tiny_cfg, arrays, message_type="train.rm_rf"), node_context()),
                   "unknown message type 'train.rm_rf'")
    assert_refused(app(message(tiny_cfg, arrays, message_type="query"), node_context()),
                   "unknown message type 'query'")
    bare = Message(RecordDict({"arrays": arrays}), dst_node_id=7, message_type="train")
    assert_refused(app(bare, node_context()), "lacks the ConfigRecord 'config'")


# --------------------------------------------------------------------------- 3. arrays


def tampered(arrays, key=None, value=None, drop=None, add=None):
    out = {k: v for k, v in arrays.items() if k != drop}
    if key is not None:
        out[key] = value
    if add is not None:
        out[add] = Array(np.zeros(3, np.float32))
    return ArrayRecord(out)


def lying(arr: np.ndarray, shape) -> Array:
    """An Array whose metadata claims `shape` but whose payload is `arr`."""
    real = Array(arr)
    return Array(dtype=real.dtype, shape=tuple(shape), stype=real.stype, data=real.data)


def adapter_cases(arrays):
    key = next(k for k in arrays if ".lora_A." in k)
    good = arrays[key].numpy()
    return {
        "missing": (tampered(arrays, drop=key), ["1 missing", key]),
        "unexpected": (tampered(arrays, add="task_decoders.classification.weight"),
                       ["1 unexpected", "task_decoders"]),
        "shape": (tampered(arrays, key, Array(good[:, :-1].copy())), [key, "shape"]),
        "dtype": (tampered(arrays, key, Array(good.astype(np.float64))), [key, "float64"]),
        "nan": (tampered(arrays, key, Array(np.full_like(good, np.nan))), [key, "NaN"]),
        "inf": (tampered(arrays, key, Array(np.full_like(good, np.inf))), [key, "NaN or Inf"]),
        "oversized": (tampered(arrays, key, lying(np.zeros(good.size * 1000, np.float32),
                                                  good.shape)), [key, "bytes"]),
        "lying shape": (tampered(arrays, key, lying(np.zeros(good.size, np.float32),
                                                    good.shape)), [key, "decodes to"]),
        "empty": (ArrayRecord({}), ["empty"]),
    }


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "dtype", "nan", "inf",
                                  "oversized", "lying shape", "empty"])
def test_bad_global_adapters_are_refused(tiny_cfg, flower_message_context, tmp_path, case):
    arrays, words = adapter_cases(initial_arrays(tiny_cfg, "ab"))[case]
    context = node_context({"state-dir": str(tmp_path)})
    reply = app(message(tiny_cfg, arrays), context)
    assert_refused(reply, *words)
    assert listing(tmp_path) == set() and PRIVATE_STATE not in context.state.array_records


def test_ffa_lora_sends_b_only_and_svd_lora_any_rank_up_to_the_largest(
        tiny_cfg, flower_message_context):
    ffa = with_overrides(tiny_cfg, **{"strategy.name": "ffa_lora"})
    b_only = initial_arrays(ffa, "b")
    assert not app(message(ffa, b_only, **{"lora-train": "b"}), node_context()).has_error()
    assert_refused(app(message(ffa, b_only, **{"lora-train": "ab"}), node_context()),
                   "missing", "lora_A")
    svd = with_overrides(tiny_cfg, **{"strategy.name": "svd_lora", "strategy.svd_rank": 12,
                                      "lora.client_ranks": [4, 8]})
    big = initial_arrays(with_overrides(tiny_cfg, **{"lora.rank": 12}), "ab")
    reply = app(message(svd, big, message_type="evaluate"), node_context())
    assert not reply.has_error(), reply.error
    too_big = initial_arrays(with_overrides(tiny_cfg, **{"lora.rank": 13}), "ab")
    assert_refused(app(message(svd, too_big, message_type="evaluate"), node_context()), "shape")


def test_bad_student_weights_are_refused(tmp_path, flower_message_context):
    cfg = load_config("configs/distill_quickstart.yaml", [
        "num_clients=3", "data.num_samples=240", f"distill.teacher.checkpoint={tmp_path}/t.pt"])
    arrays = initial_arrays(cfg, "ab")
    key = next(iter(arrays))
    bad = tampered(arrays, key, Array(np.zeros((2, 2), np.float32)))
    assert_refused(app(message(cfg, bad, message_type="evaluate"), node_context()), key, "shape")
    nan = tampered(arrays, key, Array(np.full(arrays[key].shape, np.nan, np.float32)))
    assert_refused(app(message(cfg, nan), node_context()), key, "NaN")
    assert listing(tmp_path) == set()  # not even the teacher was looked for


# --------------------------------------------------------------------------- 3. split messages


@pytest.fixture
def split_cfg():
    return load_config("configs/quickstart.yaml", [
        "num_clients=3", "data.num_samples=240", "train.batch_size=16", "split.mode=parallel",
        "split.steps_per_round=2"])


def split_arrays(cfg):
    model = mtsc.build(cfg)
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in
                        mtsc.shared_state(model, "ab", client_half_only=True).items()})


def step_message(cfg, message_type, record_name, record, **config):
    msg = message(cfg, message_type=message_type, **config)
    msg.content[record_name] = record
    return msg


def test_split_messages_with_bad_tensors_are_refused_and_the_round_goes_on(
        split_cfg, flower_message_context):
    cfg = split_cfg
    context = node_context()
    shape = (16, *mtsc.build(cfg).receiver.task_queries.shape)  # [batch, queries, d_model]
    good = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    out = ArrayRecord(encode("output", good))
    # A step before any round is open.
    assert_refused(app(step_message(cfg, "train.split_output", "output", out), context),
                   "without a split round in progress")
    begun = app(message(cfg, split_arrays(cfg), message_type="train.split_begin"), context)
    assert not begun.has_error(), begun.error
    progress = dict(context.state.config_records[PROGRESS])
    live = {k: v.numpy().copy() for k, v in context.state.array_records[LIVE_STATE].items()}
    g = good.numpy()
    cases = {
        "shape": (encode("output", good[:8]), ["'output'", "shape"]),
        "transposed": (encode("output", good.transpose(1, 2)), ["'output'", "shape"]),
        "nan": ({"output": Array(np.full_like(g, np.nan))}, ["'output'", "NaN"]),
        "dtype": ({"output": Array(g.astype(np.float64))}, ["'output'", "float64"]),
        "extra": ({**encode("output", good), "labels": Array(np.zeros(16, np.float32))},
                  ["entries", "labels"]),
        "missing": ({}, ["entries"]),
        "oversized": ({"output": lying(np.zeros(g.size * 50, np.float32), g.shape)},
                      ["bytes"]),
    }
    for name, (record, words) in cases.items():
        reply = app(step_message(cfg, "train.split_output", "output", ArrayRecord(record)),
                    context)
        assert_refused(reply, *words)
        assert dict(context.state.config_records[PROGRESS]) == progress, name
        for k, v in context.state.array_records[LIVE_STATE].items():
            np.testing.assert_array_equal(v.numpy(), live[k], err_msg=name)
    assert_refused(app(step_message(cfg, "train.split_output", "output", out,
                                    **{"server-round": 2}), context), "server-round=2")
    # The round goes on: a valid output trains the heads and returns the gradient.
    reply = app(step_message(cfg, "train.split_output", "output", out), context)
    assert not reply.has_error(), reply.error
    assert reply.content["gradients"]["output"].numpy().shape == shape
    # Gradients w.r.t. the activations: one of the wrong shape is refused.
    symbols = begun.content["activations"]["symbols"].numpy()
    counts = begun.content["activations"]["counts"].numpy()
    bad = ArrayRecord({"symbols": Array(np.zeros((symbols.shape[0] + 1, 2), np.float32)),
                       "counts": Array(np.zeros_like(counts))})
    assert_refused(app(step_message(cfg, "train.split_backward", "gradients", bad), context),
                   "'symbols'", "shape")
    ok = ArrayRecord({"symbols": Array(np.zeros_like(symbols)),
                      "counts": Array(np.zeros_like(counts))})
    reply = app(step_message(cfg, "train.split_backward", "gradients", ok), context)
    assert not reply.has_error(), reply.error
    assert "activations" in reply.content.array_records  # step 1 of 2


@pytest.mark.parametrize("scale, words", [(0.0, ["scale", "> 0"]), (np.nan, ["scale", "NaN"])])
def test_an_int8_split_tensor_needs_a_finite_positive_scale(flower_message_context, scale,
                                                            words):
    record = ArrayRecord({"output": Array(np.ones((2, 3), np.int8)),
                          "output.scale": Array(np.array([scale], np.float32))})
    msg = Message(RecordDict({"output": record}), dst_node_id=7, message_type="train")
    with pytest.raises(Refused) as err:
        split_tensors(msg, "output", {"output": (2, 3)}, {"output": "int8"})
    for w in words:
        assert w in str(err.value)
    good = ArrayRecord(encode("output", torch.ones(2, 3), "int8"))
    msg = Message(RecordDict({"output": good}), dst_node_id=7, message_type="train")
    out = split_tensors(msg, "output", {"output": (2, 3)}, {"output": "int8"})["output"]
    assert torch.allclose(out, torch.ones(2, 3))


@pytest.mark.parametrize("override, key", [
    ("name=../x", "'name'"), ("name=a/b", "'name'"),
    ("lora.target_modules=[../q_proj]", "'lora.target_modules'"),
    ("lora.target_modules=[]", "'lora.target_modules'")])
def test_names_that_become_paths_or_module_patterns_are_checked_at_load(override, key):
    from common.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        load_config("configs/quickstart.yaml", [override])
