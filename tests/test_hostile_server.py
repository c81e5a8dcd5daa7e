"""A hostile server: the ClientApp (and, in one test, a real SuperNode on loopback) is sent
a bounded set of malformed messages. Every one gets an error reply or is ignored with a
logged reason; nothing is written outside the node's folders; no private tensor is in
any reply; and the node still answers a valid message afterwards."""

import json
import logging
import os
import textwrap

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from test_message_audit import _contains
from test_trust_boundary import (
    RUN_KEY,
    adapter_cases,
    listing,
    lying,
    message,
    node_context,
    split_arrays,
    step_message,
)

from common.config import load_config
from deploy.launch import Deployment
from fl_client import trust
from fl_client.client_app import app
from fl_client.node import PRIVATE_STATE
from fl_client.trust import NODE_KEYS, REFUSED, REFUSED_UNLESS_SET_ON_NODE
from fl_server.loop import initial_arrays
from models.mtsc import workload as mtsc
from models.split_wire import encode

# Strings the client reads, each sent as a traversal and as an absolute path.
CONFIG_STRINGS = ("run-key", "lora-train", "server-round", "experiment")
EXPERIMENT_STRINGS = ("workload", "data.name", "data.partitioner", "strategy.name",
                      "split.compression", "train.amp", "channel.model", "privacy.dp.mode",
                      "lora.target_modules", *NODE_KEYS)


def _set(raw, dotted, value):
    node = raw
    for part in dotted.split(".")[:-1]:
        node = node[part]
    node[dotted.split(".")[-1]] = value


def hostile_cases(cfg, split_cfg, outside):
    """(name, message builder, "refused" | "ignored") for every malformed message."""
    arrays = initial_arrays(cfg, "ab")
    cases = []
    for path in ("../../../escaped", str(outside / "escaped-abs")):
        for entry in CONFIG_STRINGS:
            cases.append((f"config {entry}={path}",
                          lambda e=entry, p=path: message(cfg, arrays, **{e: p}), "refused"))
        for key in EXPERIMENT_STRINGS:
            raw = cfg.to_dict()
            _set(raw, key, [path] if key == "lora.target_modules" else path)
            # Node-only keys are ignored (the model checkpoint and the knowledge base are
            # refused: they would change the results); any other string is checked by the
            # config's own validation.
            expect = ("ignored" if key in NODE_KEYS and key not in REFUSED_UNLESS_SET_ON_NODE
                      else "refused")
            cases.append((f"experiment {key}={path}",
                          lambda r=json.dumps(raw): message(cfg, arrays, experiment=r), expect))
    downloads = cfg.to_dict()
    downloads["data"].update(download=True)
    cases.append(("experiment data.download=true",
                  lambda: message(cfg, arrays, experiment=json.dumps(downloads)), "ignored"))
    real = cfg.to_dict()
    real["data"].update(name="cifar10", root=str(outside / "cifar"), download=True)
    real["model"]["tasks"] = ["classification", "reconstruction"]
    cases.append(("a CIFAR-10 download into a server-chosen folder",
                  lambda: message(cfg, arrays, experiment=json.dumps(real)), "refused"))
    # Missing keys and wrong types.
    cases += [
        ("no content records", lambda: Message(RecordDict(), dst_node_id=7, message_type="train"),
         "refused"),
        ("no arrays", lambda: message(cfg), "refused"),
        ("arrays as a ConfigRecord", lambda: _arrays_as_config(cfg), "refused"),
        ("no experiment", lambda: _without(message(cfg, arrays), "experiment"), "refused"),
        ("server-round 1.5", lambda: message(cfg, arrays, **{"server-round": 1.5}), "refused"),
        ("run-key 7", lambda: message(cfg, arrays, **{"run-key": 7}), "refused"),
        ("experiment of 2 MB", lambda: message(cfg, arrays, experiment=" " * 2_000_000),
         "refused"),
    ]
    # Adapters: missing and unexpected keys, shapes, dtypes, NaN/Inf, oversized payloads.
    for name, (record, _) in adapter_cases(arrays).items():
        cases.append((f"adapters: {name}", lambda r=record: message(cfg, r), "refused"))
    # Unknown message types.
    for kind in ("query", "train.unknown", "evaluate.shell", "system"):
        cases.append((f"message type {kind}", lambda k=kind: message(cfg, arrays, message_type=k),
                      "refused"))
    # Split messages, out of order and malformed (the split round is opened in the test).
    shape = (16, *mtsc.build(split_cfg).receiver.task_queries.shape)
    good = torch.zeros(shape)
    cases += [
        ("split_backward before split_begin's round", lambda: step_message(
            split_cfg, "train.split_backward", "gradients", ArrayRecord()), "refused"),
        ("split_begin with NaN adapters", lambda: message(
            split_cfg, _nan(split_arrays(split_cfg)), message_type="train.split_begin"),
         "refused"),
    ]
    return cases, [
        ("split_output of the wrong shape", lambda: step_message(
            split_cfg, "train.split_output", "output", ArrayRecord(encode("output", good[:3]))),
         "refused"),
        ("split_output with Inf", lambda: step_message(
            split_cfg, "train.split_output", "output",
            ArrayRecord({"output": Array(np.full(shape, np.inf, np.float32))})), "refused"),
        ("split_output oversized", lambda: step_message(
            split_cfg, "train.split_output", "output", ArrayRecord({"output": lying(
                np.zeros(int(np.prod(shape)) * 64, np.float32), shape)})), "refused"),
        ("split_output without its record", lambda: step_message(
            split_cfg, "train.split_output", "gradients", ArrayRecord()), "refused"),
        ("split_backward with NaN gradients", lambda: step_message(
            split_cfg, "train.split_backward", "gradients", ArrayRecord({
                "symbols": Array(np.full((4, 2), np.nan, np.float32)),
                "counts": Array(np.zeros(3, np.float32))})), "refused"),
        ("split_score with labels attached", lambda: step_message(
            split_cfg, "evaluate.split_score", "output", ArrayRecord({
                **encode("output", good), "label": Array(np.zeros(16, np.float32))})),
         "refused"),
    ]


def _without(msg, entry):
    del msg.content["config"][entry]
    return msg


def _arrays_as_config(cfg):
    msg = message(cfg)
    msg.content["arrays"] = ConfigRecord({"x": 1})
    return msg


def _nan(record):
    out = {k: v for k, v in record.items()}
    key = next(iter(out))
    out[key] = Array(np.full(out[key].numpy().shape, np.nan, np.float32))
    return ArrayRecord(out)


def private_tensors(context):
    saved = context.state.array_records[PRIVATE_STATE]
    return {n: a.numpy() for n, a in saved.items() if ".lora_" not in n}


def test_the_client_app_survives_a_hostile_server(tiny_cfg, flower_message_context, tmp_path,
                                                  caplog, capsys, monkeypatch):
    monkeypatch.setattr(trust, "_warned", set())  # it warns once per value and process
    split_cfg = load_config("configs/quickstart.yaml", [
        "num_clients=3", "data.num_samples=240", "train.batch_size=16", "split.mode=parallel",
        "split.steps_per_round=2"])
    node = tmp_path / "node"
    state = node / "state"
    state.mkdir(parents=True)
    context = node_context({"state-dir": str(state)})
    split_context = node_context({"state-dir": str(state)}, node_id=8)
    valid = message(tiny_cfg, initial_arrays(tiny_cfg, "ab"))
    assert not app(valid, context).has_error()  # the node holds private tensors now
    private = private_tensors(context)
    before = listing(tmp_path) - listing(node)
    cases, split_step_cases = hostile_cases(tiny_cfg, split_cfg, tmp_path)
    replies, outcomes = [], {}
    for name, build, expect in cases + [("split_begin", None, "valid")] + split_step_cases:
        ctx = split_context if name.startswith("split") else context
        if build is None:  # open a split round for the step cases that follow
            begun = app(message(split_cfg, split_arrays(split_cfg),
                                message_type="train.split_begin"), ctx)
            assert not begun.has_error(), begun.error
            continue
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fedsemcom"):
            reply = app(build(), ctx)
        replies.append(reply)
        if reply.has_error():
            outcomes[name] = "refused"
            # Caught by a check (fl_client.trust or the config's), not by a crash.
            assert reply.error.code == REFUSED, (name, reply.error.reason)
            assert reply.error.reason and not reply.has_content(), name
        else:
            outcomes[name] = "ignored"
            assert "ignoring " in caplog.text, f"{name}: accepted without a logged reason"
    wrong = {n: (outcomes[n], e) for n, e in
             [(n, e) for n, _, e in cases + split_step_cases] if outcomes[n] != e}
    assert not wrong, wrong
    # Nothing outside the node's folder; inside it only this run's own state files.
    assert listing(tmp_path) - listing(node) == before
    assert {p.relative_to(state).parts[0] for p in state.rglob("*.npz")} == {RUN_KEY}
    for reply in replies:  # no private tensor in any reply
        for record in reply.content.array_records.values() if reply.has_content() else ():
            for key, arr in record.items():
                for pname, secret in private.items():
                    assert not _contains(arr.numpy(), secret.ravel()[:16]), (key, pname)
    # The node still answers valid messages, federated and split.
    assert not app(message(tiny_cfg, initial_arrays(tiny_cfg, "ab"),
                           **{"server-round": 2}), context).has_error()
    assert not app(message(split_cfg, split_arrays(split_cfg), message_type="train.split_begin"),
                   split_context).has_error()
    refused = sum(o == "refused" for o in outcomes.values())
    with capsys.disabled():
        print(f"\nhostile server: {len(outcomes)} malformed messages, {refused} refused with "
              f"an error reply, {len(outcomes) - refused} ignored with a logged reason")
    assert len(outcomes) >= 60


# --------------------------------------------------------------------------- a real SuperNode

HOSTILE_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "hostile"
version = "1.0.0"
description = "A ServerApp that sends malformed messages to fedsemcom's ClientApp"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "tests"

[tool.flwr.app.components]
serverapp = "hostile_server:app"
clientapp = "fl_client.client_app:app"

[tool.flwr.app.config]
out = ""
"""

HOSTILE_SERVER = '''
"""Sends malformed messages, then a valid one, and writes what came back."""
import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from common.config import load_config
from fl_server.exchange import send_and_receive
from fl_server.loop import initial_arrays

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_config("configs/quickstart.yaml", [
        "num_clients=1", "min_train_clients=1", "data.num_samples=120",
        "train.batch_size=16"])
    arrays = initial_arrays(cfg, "ab")
    nan = {k: v for k, v in arrays.items()}
    key = next(iter(nan))
    nan[key] = Array(np.full(arrays[key].numpy().shape, np.nan, np.float32))
    (node,) = grid.get_node_ids()

    def msg(kind, records, **config):
        entries = {"experiment": cfg.to_json(), "run-key": "ok", "server-round": 1,
                   "lora-train": "ab", **config}
        return Message(RecordDict({"arrays": records, "config": ConfigRecord(entries)}),
                       dst_node_id=node, message_type=kind)

    cases = {
        "traversal run-key": msg("train", arrays, **{"run-key": "../../escaped"}),
        "NaN adapters": msg("train", ArrayRecord(nan)),
        "unknown message type": msg("train.unknown", arrays),
        "valid evaluate": msg("evaluate", arrays),
    }
    got, _ = send_and_receive(grid, list(cases.values()), timeout=120)
    by_id = {r.metadata.reply_to_message_id: r for r in got}
    replies = {}
    for name, m in cases.items():
        reply = by_id[m.metadata.message_id]
        replies[name] = {
            "error": [reply.error.code, reply.error.reason] if reply.has_error() else None,
            "arrays": sorted(reply.content.array_records) if reply.has_content() else [],
            "metrics": sorted(k for r in reply.content.metric_records.values() for k in r)
            if reply.has_content() else []}
    with open(context.run_config["out"], "w") as f:
        json.dump(replies, f)
'''


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for good
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.engine
@pytest.mark.timeout(300)
def test_a_real_supernode_survives_a_hostile_server(tmp_path):
    app_dir = tmp_path / "hostile-app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(HOSTILE_PYPROJECT)
    (app_dir / "hostile_server.py").write_text(textwrap.dedent(HOSTILE_SERVER))
    out = tmp_path / "replies.json"
    dep = Deployment(tmp_path / "deploy", num_supernodes=1, state_dir=str(tmp_path / "state"))
    assert dep.host == "127.0.0.1"
    try:
        dep.start()
        pids = [p.pid for p in dep.procs.values()]
        before = listing(tmp_path) - listing(tmp_path / "deploy") - listing(tmp_path / "state")
        run = dep.flwr("run", str(app_dir), dep.connection, "--run-config", f'out="{out}"',
                       "--stream", timeout=240)
        after = listing(tmp_path) - listing(tmp_path / "deploy") - listing(tmp_path / "state")
    finally:
        dep.stop()
    assert out.is_file(), run.stdout[-3000:] + run.stderr[-2000:]
    replies = json.loads(out.read_text())
    for name in ("traversal run-key", "NaN adapters", "unknown message type"):
        code, reason = replies[name]["error"]
        assert code == REFUSED and replies[name]["arrays"] == [], (name, reason)
    assert "run-key='../../escaped'" in replies["traversal run-key"]["error"][1]
    assert "NaN" in replies["NaN adapters"]["error"][1]
    assert "train.unknown" in replies["unknown message type"]["error"][1]
    valid = replies["valid evaluate"]
    assert valid["error"] is None and valid["arrays"] == [] and "accuracy" in valid["metrics"]
    assert after - before == {str(out)}  # nothing but the ServerApp's own report
    assert not list((tmp_path / "state").rglob("*.npz"))  # the refused train wrote nothing
    assert not [pid for pid in pids if alive(pid)]
