"""Nothing private leaves a client: every message the ClientApp sends is inspected.

The ClientApp is called exactly as Flower's runtime calls it (message in, reply out);
what it returns is what the runtime sends to the server. The audit proves that a reply holds only
the workload's shared_state (LoRA adapters for mtsc, student weights for tosc) and scalar
metrics: no task-decoder, task-head or other private tensor, no label, caption, answer,
question, image or stored teacher output.
"""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from common.config import config_from_dict, load_config
from common.data import load_partition
from fl_client.client_app import app
from fl_client.node import PRIVATE_STATE
from fl_client.trust import node_config_of
from fl_server.loop import initial_arrays
from models.client_state import local_parameters
from models.mtsc import workload as mtsc
from models.tosc import teacher as tosc_teacher
from models.tosc import workload as tosc

ALLOWED_METRICS = {
    "train_loss", "symbols_per_example", "num-examples", "loss_classification",
    "loss_vqa", "loss_captioning", "loss_reconstruction", "loss", "accuracy",
    "vqa_accuracy", "bleu", "psnr", "majority_class_share", "cider", "vqa_bleu",
    # tosc: distillation loss terms and the pre-stored teacher outputs' cost (scalars)
    "loss_task", "loss_ib", "loss_kd", "loss_feature", "teacher_seconds", "teacher_store_bytes",
    # DP-SGD: the client's cumulative epsilon and its noise multiplier (scalars)
    "dp_epsilon", "dp_noise_multiplier",
    "uniform-weight",  # central DP: every client weighs the same in the mean
}


def _contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    """Is `needle` (flattened, length >= 4) a contiguous run inside `haystack`?"""
    h, n = haystack.ravel().astype(np.float64), needle.ravel().astype(np.float64)
    if n.size < 4 or n.size > h.size:
        return False
    windows = np.lib.stride_tricks.sliding_window_view(h, n.size)
    return bool(np.any(np.all(np.isclose(windows, n, rtol=0, atol=1e-6), axis=1)))


def run_client(cfg, lora_train, message_type, context, arrays):
    config = ConfigRecord({"experiment": cfg.to_json(), "lora-train": lora_train,
                           "server-round": 1})
    msg = Message(RecordDict({"arrays": arrays, "config": config}),
                  dst_node_id=context.node_id, message_type=message_type)
    reply = app(msg, context)
    assert not reply.has_error(), reply.error
    return reply


@pytest.mark.parametrize("lora_train, dp", [("ab", False), ("b", False), ("ab", True)])
def test_no_private_tensor_or_label_leaves_the_client(tiny_cfg, flower_message_context,
                                                      lora_train, dp):
    cfg = tiny_cfg
    if dp:  # DP-SGD adds its scalars to the reply and nothing else
        cfg = config_from_dict(cfg.to_dict(), {"privacy.dp.mode": "local",
                                               "privacy.dp.noise_multiplier": 1.0})
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    arrays = initial_arrays(cfg, lora_train)
    train_reply = run_client(cfg, lora_train, "train", context, arrays)
    eval_reply = run_client(cfg, lora_train, "evaluate", context, arrays)

    # What the client holds privately after training: its modules and its data.
    model = mtsc.build(cfg)
    saved = context.state.array_records[PRIVATE_STATE]
    # Everything the node keeps except the adapters, which mtsc shares by design.
    private = {name: arr.numpy() for name, arr in saved.items() if ".lora_" not in name}
    assert any(n.startswith("task_decoders.") for n in private)
    train_ds, test_ds = load_partition(cfg.data, 1, 3, cfg.model.caption_len)
    data = {}
    for split, ds in (("train", train_ds), ("test", test_ds)):
        for key in ("label", "answer", "caption", "question", "image"):
            data[f"{split}.{key}"] = torch.stack([ds[i][key] for i in range(len(ds))]).numpy()

    expected_keys = set(mtsc.shared_state(model, lora_train))
    for reply in (train_reply, eval_reply):
        content = reply.content
        assert not content.config_records, "a client sends no ConfigRecord"
        for record in content.metric_records.values():
            assert set(record) <= ALLOWED_METRICS, set(record) - ALLOWED_METRICS
            for key, value in record.items():
                assert isinstance(value, (int, float)), f"metric {key} must be a scalar"
        for record in content.array_records.values():
            assert set(record) == expected_keys
            for key, arr in record.items():
                values = arr.numpy()
                assert "task_decoders" not in key and ".lora_" in key
                for name, secret in private.items():
                    assert not (secret.shape == values.shape and np.allclose(secret, values)), \
                        f"{key} equals private tensor {name}"
                for name, secret in data.items():
                    assert not _contains(values, secret[:16]), f"{key} carries {name}"
    assert not eval_reply.content.array_records, "evaluation replies carry metrics only"
    assert len(train_reply.content.array_records) == 1


def test_private_modules_persist_between_rounds_on_the_node(tiny_cfg, flower_message_context):
    context = Context(run_id=1, node_id=3, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    arrays = initial_arrays(tiny_cfg, "ab")
    run_client(tiny_cfg, "ab", "train", context, arrays)
    first = {k: v.numpy().copy() for k, v in context.state.array_records[PRIVATE_STATE].items()}
    run_client(tiny_cfg, "ab", "train", context, arrays)
    second = context.state.array_records[PRIVATE_STATE]
    head = "task_decoders.classification.weight"
    fresh = local_parameters(mtsc.build(tiny_cfg))[head].detach().numpy()
    # Round 2 starts from round 1's heads (they changed again), not from a fresh init.
    assert not np.allclose(first[head], fresh)
    assert not np.allclose(second[head].numpy(), first[head])


def test_a_node_keeps_the_running_statistics_of_the_batch_norms_it_trains():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3),
                              torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)))
    for p in net[2].parameters():  # a frozen block: its statistics are not the node's
        p.requires_grad_(False)
    net.train()
    net(torch.randn(64, 4) * 5 + 2)  # round 1 moves the running statistics
    kept = {n: t.detach().clone() for n, t in local_parameters(net).items()}
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(kept)
    assert not any(n.startswith("2.") for n in kept)
    # Round 2 on the node: a freshly built model loads what was kept, as _setup does.
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3),
                                torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)))
    for p in fresh[2].parameters():
        p.requires_grad_(False)
    assert not torch.allclose(fresh[1].running_var, kept["1.running_var"])
    params = local_parameters(fresh)
    with torch.no_grad():
        for name, value in kept.items():
            params[name].copy_(value)
    fresh.eval(), net.eval()
    x = torch.randn(8, 4)
    assert torch.equal(fresh[1](fresh[0](x)), net[1](net[0](x)))


SPLIT_TENSORS = {
    "activations": {"symbols", "counts", "snr_db"},  # after the uplink channel
    "gradients": {"output"},  # gradient w.r.t. the server half's output
}


def test_split_training_sends_only_activations_gradients_adapters_and_metrics(
        tiny_cfg, flower_message_context, tmp_path):
    from test_server_rounds import LoopbackGrid

    from fl_server.rounds import run_federated

    cfg = load_config("configs/quickstart.yaml", [
        "num_clients=3", "rounds=1", "data.num_samples=240", "train.batch_size=16",
        "split.mode=parallel", "split.steps_per_round=2", f"output_dir={tmp_path}"])
    grid = LoopbackGrid(3)
    sent: list[tuple[str, Message]] = []
    deliver = grid.send_and_receive

    def recording(messages, *, timeout=None):
        messages = list(messages)
        replies = deliver(messages, timeout=timeout)
        for msg, reply in zip(messages, replies):
            if msg.metadata.dst_node_id == 102:  # audit partition 1
                sent.append((msg.metadata.message_type, reply))
        return replies

    grid.send_and_receive = recording
    run_federated(grid, cfg, tmp_path / "run")
    kinds = {kind for kind, _ in sent}
    assert kinds == {"train.split_begin", "train.split_output", "train.split_backward",
                     "evaluate.split_forward", "evaluate.split_score"}

    model = mtsc.build(cfg)
    saved = grid.contexts[102].state.array_records[PRIVATE_STATE]
    private = {n: a.numpy() for n, a in saved.items() if ".lora_" not in n}
    assert any(n.startswith("task_decoders.") for n in private)
    assert not any(n.startswith("receiver.") for n in saved), "the server half is not the client's"
    train_ds, test_ds = load_partition(cfg.data, 1, 3, cfg.model.caption_len)
    data = {f"{s}.{k}": torch.stack([ds[i][k] for i in range(len(ds))]).numpy()
            for s, ds in (("train", train_ds), ("test", test_ds))
            for k in ("label", "answer", "caption", "question", "image")}
    adapters = set(mtsc.shared_state(model, "ab", client_half_only=True))
    assert adapters and all(k.startswith("encoder.") for k in adapters)

    for kind, reply in sent:
        content = reply.content
        for name, record in content.config_records.items():
            assert name == "split" and set(record) <= {"partition-id", "num-partitions", "step",
                                                         "steps"}, kind
        for record in content.metric_records.values():
            assert set(record) <= ALLOWED_METRICS, set(record) - ALLOWED_METRICS
        for name, record in content.array_records.items():
            assert set(record) == (adapters if name == "arrays" else SPLIT_TENSORS[name]), kind
            for key, arr in record.items():
                values = arr.numpy()
                for pname, secret in private.items():
                    assert not (secret.shape == values.shape and np.allclose(secret, values)), \
                        f"{kind}: {key} equals private tensor {pname}"
                for dname, secret in data.items():
                    assert not _contains(values, secret[:16]), f"{kind}: {key} carries {dname}"


@pytest.mark.parametrize("feature_weight", [0.0, 0.5])
def test_tosc_sends_student_weights_but_no_head_label_image_or_teacher_output(
        tmp_path, flower_message_context, feature_weight):
    cfg = load_config("configs/distill_quickstart.yaml", [
        "num_clients=3", "data.num_samples=240", "distill.teacher.public_samples=60",
        "distill.teacher.epochs=1", f"distill.teacher.checkpoint={tmp_path / 'teacher.pt'}",
        f"distill.feature_weight={feature_weight}"])
    tosc_teacher.ensure_teacher(cfg, log=lambda _: None)
    # The node's own copy of the teacher file (node config teacher-checkpoint).
    node_config = {"partition-id": 1, "num-partitions": 3, **node_config_of(cfg)}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config={})
    arrays = initial_arrays(cfg, "ab")
    train_reply = run_client(cfg, "ab", "train", context, arrays)
    eval_reply = run_client(cfg, "ab", "evaluate", context, arrays)

    saved = context.state.array_records[PRIVATE_STATE]
    head = {name: arr.numpy() for name, arr in saved.items() if name.startswith(tosc.HEAD)}
    assert set(head) == {"head.weight", "head.bias"}
    train_ds, test_ds = load_partition(cfg.data, 1, 3, cfg.model.caption_len)
    stored, _ = tosc_teacher.prestored_teacher_outputs(cfg, train_ds)
    secrets = {"teacher.topk_values": stored.topk_values.astype(np.float32)}
    if feature_weight > 0:
        secrets["teacher.features"] = stored.features.astype(np.float32)
    for split, ds in (("train", train_ds), ("test", test_ds)):
        for key in ("label", "image"):
            secrets[f"{split}.{key}"] = torch.stack([ds[i][key] for i in range(len(ds))]).numpy()

    expected_keys = set(tosc.shared_state(tosc.build(cfg)))
    assert expected_keys and not any(k.startswith(tosc.HEAD) for k in expected_keys)
    for reply in (train_reply, eval_reply):
        content = reply.content
        assert not content.config_records, "a client sends no ConfigRecord"
        for record in content.metric_records.values():
            assert set(record) <= ALLOWED_METRICS, set(record) - ALLOWED_METRICS
            assert all(isinstance(v, (int, float)) for v in record.values())
        for record in content.array_records.values():
            assert set(record) == expected_keys
            for key, arr in record.items():
                values = arr.numpy()
                for name, secret in head.items():
                    assert not (secret.shape == values.shape and np.allclose(secret, values)), \
                        f"{key} equals the private {name}"
                    assert not _contains(values, secret.ravel()[:16]), f"{key} carries {name}"
                for name, secret in secrets.items():
                    assert not _contains(values, secret[:16]), f"{key} carries {name}"
    assert not eval_reply.content.array_records, "evaluation replies carry metrics only"
    assert len(train_reply.content.array_records) == 1
