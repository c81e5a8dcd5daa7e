"""Tests of the LoRA strategies against direct NumPy computation (no Ray, no simulation)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from strategies import FedAvgLoRA, FFALoRA, SVDLoRA, build_strategy
from strategies.reply_checks import arrayrecord_nbytes, valid_train_replies
from strategies.svd_lora import merge_lora_products

ALPHA = 16.0
OUT, IN = 20, 24  # a module's out_features, in_features
MODULES = [f"base_model.model.encoder.layers.{i}.self_attn.q_proj" for i in range(2)]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """flwr 1.41 stamps every new Message with the run of the current process;
    outside a ServerApp/ClientApp that identity is unset and Message() raises."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeGrid:
    """The only part of a Grid that FedAvg.configure_train uses."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def lora_arrays(rng, rank, modules=MODULES, out_f=OUT, in_f=IN, b_only=False):
    """peft-style adapter state dict: A [r, in], B [out, r] for each module."""
    arrays = {}
    for m in modules:
        if not b_only:
            arrays[f"{m}.lora_A.weight"] = rng.standard_normal((rank, in_f)).astype(np.float32)
        arrays[f"{m}.lora_B.weight"] = rng.standard_normal((out_f, rank)).astype(np.float32)
    return arrays


def record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def reply(node_id, arrays, num_examples, **metrics):
    """A train reply from ``node_id``, built as a ClientApp builds it: reply_to a request."""
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    content = RecordDict(
        {
            "arrays": record(arrays),
            "metrics": MetricRecord({"num-examples": num_examples, "train_loss": 1.0, **metrics}),
        }
    )
    return Message(content, reply_to=request)


def error_reply(node_id, reason="CUDA out of memory"):
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    return Message(Error(code=1, reason=reason), reply_to=request)


def send(strategy, arrays, node_ids=(1, 2, 3), config=None):
    """Run configure_train, as Strategy.start does before each round."""
    return list(
        strategy.configure_train(1, record(arrays), config or ConfigRecord(), FakeGrid(node_ids))
    )


def as_numpy(array_record):
    return {k: v.numpy() for k, v in array_record.items()}


def weighted_mean(arrays_per_client, weights):
    p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return {
        k: sum(pk * a[k].astype(np.float64) for pk, a in zip(p, arrays_per_client))
        for k in arrays_per_client[0]
    }


def product(arrays, module, alpha=ALPHA):
    a, b = arrays[f"{module}.lora_A.weight"], arrays[f"{module}.lora_B.weight"]
    return (alpha / a.shape[0]) * b.astype(np.float64) @ a.astype(np.float64)


# --- configure_train ---------------------------------------------------------


def test_configure_train_sends_the_arrays_and_lora_train():
    rng = np.random.default_rng(0)
    arrays = lora_arrays(rng, rank=4)
    caller_config = ConfigRecord({"lr": 1e-3})
    messages = send(FedAvgLoRA(), arrays, node_ids=[11, 12, 13], config=caller_config)

    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13]
    for msg in messages:
        assert msg.metadata.message_type == "train"
        sent = as_numpy(msg.content["arrays"])
        assert sent.keys() == arrays.keys()
        for k in arrays:
            np.testing.assert_array_equal(sent[k], arrays[k])
        config = msg.content["config"]
        assert config["lora-train"] == "ab"
        assert config["server-round"] == 1
        assert config["lr"] == 1e-3
    assert "lora-train" not in caller_config  # the caller's record is not modified


def test_configure_train_keeps_fedavg_sampling_arguments():
    strategy = FedAvgLoRA(fraction_train=0.5, min_train_nodes=1, min_available_nodes=1)
    messages = send(strategy, lora_arrays(np.random.default_rng(0), 2), node_ids=[1, 2, 3, 4])
    assert len(messages) == 2


# --- fedavg_lora -------------------------------------------------------------


def test_fedavg_lora_equals_flower_fedavg_and_the_weighted_mean():
    rng = np.random.default_rng(1)
    global_arrays = lora_arrays(rng, rank=4)
    clients = [lora_arrays(rng, rank=4) for _ in range(3)]
    weights = [10, 30, 60]
    losses = [3.0, 2.0, 1.0]
    replies = [
        reply(i + 1, c, w, train_loss=loss)
        for i, (c, w, loss) in enumerate(zip(clients, weights, losses))
    ]

    strategy = FedAvgLoRA()
    send(strategy, global_arrays)
    arrays, metrics = strategy.aggregate_train(1, replies)
    flower_arrays, _ = FedAvg().aggregate_train(1, replies)

    ours, flower = as_numpy(arrays), as_numpy(flower_arrays)
    by_hand = weighted_mean(clients, weights)
    assert ours.keys() == flower.keys() == global_arrays.keys()
    for k in ours:
        assert np.max(np.abs(ours[k] - flower[k])) < 1e-7
        assert np.max(np.abs(ours[k] - by_hand[k])) < 1e-6
    assert metrics["train_loss"] == pytest.approx(np.average(losses, weights=weights))
    assert metrics["clients_accepted"] == 3
    assert metrics["clients_rejected"] == 0
    nbytes = sum(a.nbytes for a in global_arrays.values())
    assert metrics["bytes_down"] == nbytes == 2 * 4 * (4 * IN + OUT * 4)
    assert metrics["bytes_up"] == nbytes  # same shapes and dtype as sent


def test_averaging_factors_is_not_averaging_products():
    """Why svd_lora exists: mean(B) @ mean(A) != mean(B @ A) (FedIT's error)."""
    rng = np.random.default_rng(2)
    clients = [lora_arrays(rng, rank=4, modules=MODULES[:1]) for _ in range(2)]
    strategy = FedAvgLoRA()
    send(strategy, clients[0])
    arrays, _ = strategy.aggregate_train(1, [reply(1, clients[0], 1), reply(2, clients[1], 1)])

    product_of_means = product(as_numpy(arrays), MODULES[0])
    mean_of_products = (product(clients[0], MODULES[0]) + product(clients[1], MODULES[0])) / 2
    gap = np.linalg.norm(product_of_means - mean_of_products) / np.linalg.norm(mean_of_products)
    assert gap > 0.3

    svd = SVDLoRA(target_rank=8, lora_alpha=ALPHA)
    send(svd, clients[0])
    svd_arrays, _ = svd.aggregate_train(1, [reply(1, clients[0], 1), reply(2, clients[1], 1)])
    np.testing.assert_allclose(
        product(as_numpy(svd_arrays), MODULES[0]), mean_of_products, atol=1e-5
    )


# --- ffa_lora ----------------------------------------------------------------


def test_ffa_lora_sends_lora_train_b():
    messages = send(FFALoRA(), lora_arrays(np.random.default_rng(3), 4, b_only=True))
    assert all(m.content["config"]["lora-train"] == "b" for m in messages)


def test_ffa_lora_average_of_b_with_common_a_is_the_average_of_products():
    rng = np.random.default_rng(4)
    rank, module = 4, MODULES[0]
    shared_a = rng.standard_normal((rank, IN)).astype(np.float32)  # same seed on every client
    clients = [lora_arrays(rng, rank, modules=[module], b_only=True) for _ in range(3)]
    weights = [5, 1, 2]

    strategy = FFALoRA()
    send(strategy, clients[0])
    arrays, metrics = strategy.aggregate_train(
        1, [reply(i, c, w) for i, (c, w) in enumerate(zip(clients, weights))]
    )
    b_key = f"{module}.lora_B.weight"
    assert list(arrays.keys()) == [b_key]

    with_a = lambda b: {f"{module}.lora_A.weight": shared_a, b_key: b}  # noqa: E731
    global_product = product(with_a(arrays[b_key].numpy()), module)
    products = [{"d": product(with_a(c[b_key]), module)} for c in clients]
    mean_product = weighted_mean(products, weights)["d"]
    np.testing.assert_allclose(global_product, mean_product, atol=1e-5)
    assert metrics["bytes_up"] == OUT * rank * 4


def test_ffa_lora_rejects_a_reply_with_lora_a(caplog):
    rng = np.random.default_rng(5)
    b_only = lora_arrays(rng, 4, b_only=True)
    strategy = FFALoRA()
    send(strategy, b_only)
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(
            1, [reply(1, b_only, 1), reply(9, lora_arrays(rng, 4), 1)]
        )
    assert metrics["clients_rejected"] == 1
    assert "node 9: it contains lora_A arrays" in caplog.text
    for k in b_only:
        np.testing.assert_array_equal(arrays[k].numpy(), b_only[k])


def test_ffa_lora_refuses_to_send_a():
    with pytest.raises(ValueError, match="only the lora_B arrays"):
        send(FFALoRA(), lora_arrays(np.random.default_rng(6), 4))


# --- svd_lora ----------------------------------------------------------------


def _svd_round(ranks, weights, target_rank, seed=7, extra=None):
    rng = np.random.default_rng(seed)
    clients = [lora_arrays(rng, r) for r in ranks]
    if extra:  # a non-LoRA array, e.g. a trained head: plain FedAvg
        for c in clients:
            c[extra] = rng.standard_normal((3, 5)).astype(np.float32)
    global_arrays = lora_arrays(rng, target_rank)
    if extra:
        global_arrays[extra] = np.zeros((3, 5), np.float32)
    strategy = SVDLoRA(target_rank=target_rank, lora_alpha=ALPHA)
    send(strategy, global_arrays)
    replies = [reply(i + 1, c, w) for i, (c, w) in enumerate(zip(clients, weights))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    return clients, as_numpy(arrays), metrics


def _exact_update(clients, weights, module):
    p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return sum(pk * product(c, module) for pk, c in zip(p, clients))


def test_svd_lora_is_exact_when_the_target_rank_holds_all_client_ranks():
    ranks, weights, target = [2, 4, 8], [30, 10, 60], 16  # 16 >= 2 + 4 + 8
    clients, arrays, metrics = _svd_round(ranks, weights, target, extra="classifier.weight")

    for m in MODULES:
        a, b = arrays[f"{m}.lora_A.weight"], arrays[f"{m}.lora_B.weight"]
        assert a.shape == (target, IN) and b.shape == (OUT, target)
        assert a.dtype == b.dtype == np.float32
        exact = _exact_update(clients, weights, m)
        assert np.max(np.abs(product(arrays, m) - exact)) < 1e-5
        # 14 components at most; the last two are zero padding.
        assert np.all(a[sum(ranks):] == 0) and np.all(b[:, sum(ranks):] == 0)
    np.testing.assert_allclose(
        arrays["classifier.weight"],
        weighted_mean([{"w": c["classifier.weight"]} for c in clients], weights)["w"],
        atol=1e-6,
    )
    assert metrics["clients_accepted"] == 3
    assert metrics["bytes_up"] == pytest.approx(
        np.mean([sum(v.nbytes for v in c.values()) for c in clients])
    )


def test_svd_lora_small_rank_is_the_best_rank_r_approximation():
    ranks, weights, target = [2, 4, 8], [1, 1, 2], 3
    clients, arrays, _ = _svd_round(ranks, weights, target)
    for m in MODULES:
        exact = _exact_update(clients, weights, m)
        u, s, vt = np.linalg.svd(exact)
        truncated = (u[:, :target] * s[:target]) @ vt[:target]
        ours = product(arrays, m)
        np.testing.assert_allclose(ours, truncated, atol=1e-5)
        # Eckart-Young: the error is the energy of the dropped singular values.
        assert np.linalg.norm(exact - ours) == pytest.approx(
            np.sqrt(np.sum(s[target:] ** 2)), rel=1e-5
        )
        # Components come in singular-value order, split evenly between B and A.
        b, a = arrays[f"{m}.lora_B.weight"], arrays[f"{m}.lora_A.weight"]
        scale = ALPHA / target
        np.testing.assert_allclose(scale * np.linalg.norm(b, axis=0) ** 2, s[:target], rtol=1e-5)
        np.testing.assert_allclose(scale * np.linalg.norm(a, axis=1) ** 2, s[:target], rtol=1e-5)
        assert np.all(np.diff(np.linalg.norm(b, axis=0)) <= 0)


def test_merge_pads_with_zeros_when_the_rank_exceeds_the_module():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((6, 5))
    b = rng.standard_normal((4, 6))
    a_out, b_out = merge_lora_products([a], [b], [1.0], ALPHA, target_rank=8)
    assert a_out.shape == (8, 5) and b_out.shape == (4, 8)  # rank capped at min(4, 5)
    np.testing.assert_allclose(
        (ALPHA / 8) * b_out.astype(np.float64) @ a_out, (ALPHA / 6) * b @ a, atol=1e-5
    )
    assert np.all(a_out[4:] == 0) and np.all(b_out[:, 4:] == 0)


def test_svd_lora_rejects_inconsistent_ranks(caplog):
    rng = np.random.default_rng(9)
    good = lora_arrays(rng, 2)
    mismatched = lora_arrays(rng, 4)
    mismatched[f"{MODULES[0]}.lora_B.weight"] = rng.standard_normal((OUT, 3)).astype(np.float32)
    wrong_in = lora_arrays(rng, 4, in_f=IN + 1)
    strategy = SVDLoRA(target_rank=8, lora_alpha=ALPHA)
    send(strategy, lora_arrays(rng, 8))
    with caplog.at_level(logging.WARNING):
        _, metrics = strategy.aggregate_train(
            1, [reply(1, good, 1), reply(2, mismatched, 1), reply(3, wrong_in, 1)]
        )
    assert metrics["clients_accepted"] == 1 and metrics["clients_rejected"] == 2
    assert "node 2: " in caplog.text and "has rank 4 but" in caplog.text
    assert "node 3: " in caplog.text and "(any rank in dim 0)" in caplog.text


def test_svd_lora_validates_its_arguments():
    with pytest.raises(ValueError, match="target_rank"):
        SVDLoRA(target_rank=0, lora_alpha=ALPHA)
    with pytest.raises(ValueError, match="lora_alpha"):
        SVDLoRA(target_rank=4, lora_alpha=0)


# --- reply checks ------------------------------------------------------------


KEY_A = f"{MODULES[0]}.lora_A.weight"


def _with_nan(a):
    a[KEY_A][0, 0] = np.nan


def _with_inf(a):
    a[KEY_A][1, 2] = np.inf


def _narrower(a):
    a[KEY_A] = a[KEY_A][:, :-1].copy()


def _extra_key(a):
    a["extra.lora_A.weight"] = a[KEY_A]


def _missing_key(a):
    del a[KEY_A]


def _float64(a):  # same shapes, twice the bytes
    a.update({k: v.astype(np.float64) for k, v in a.items()})


def _float16(a):
    a.update({k: v.astype(np.float16) for k, v in a.items()})


def test_bad_replies_are_dropped_and_the_round_goes_on(caplog):
    rng = np.random.default_rng(10)
    global_arrays = lora_arrays(rng, 4)
    valid = {1: (lora_arrays(rng, 4), 10), 2: (lora_arrays(rng, 4), 30)}
    bad = {  # node id -> (how the reply is broken, the reason logged)
        101: (_with_nan, f"'{KEY_A}' contains NaN or Inf"),
        102: (_with_inf, f"'{KEY_A}' contains NaN or Inf"),
        103: (_narrower, f"'{KEY_A}' has shape (4, 23), expected (4, 24)"),
        104: (_extra_key, "0 missing [], 1 unexpected ['extra.lora_A.weight']"),
        105: (_missing_key, f"1 missing ['{KEY_A}'], 0 unexpected []"),
        106: (_float64, "more than the limit of"),
        107: (_float16, "has dtype float16, expected float32"),
    }
    replies = [reply(node, arrays, w) for node, (arrays, w) in valid.items()]
    for node, (breaks, _) in bad.items():
        arrays = lora_arrays(rng, 4)
        breaks(arrays)
        replies.append(reply(node, arrays, 50))
    replies.append(error_reply(108, "CUDA out of memory"))

    nbytes = sum(a.nbytes for a in global_arrays.values())
    strategy = FedAvgLoRA(max_update_bytes=nbytes)
    send(strategy, global_arrays)
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(1, iter(replies))  # one-shot iterable

    logged = [r.getMessage() for r in caplog.records]
    for node, (_, reason) in bad.items():
        prefix = f"Dropping the reply of node {node}: "
        assert any(m.startswith(prefix) and reason in m for m in logged), (node, logged)
    assert (
        "Dropping the reply of node 108: the client failed (error code 1): "
        "CUDA out of memory" in logged
    )
    assert not any("node 1:" in m or "node 2:" in m for m in logged)

    only_valid = FedAvgLoRA()
    send(only_valid, global_arrays)
    alone, _ = only_valid.aggregate_train(1, replies[:2])
    expected = weighted_mean([a for a, _ in valid.values()], [w for _, w in valid.values()])
    for k, v in as_numpy(arrays).items():
        np.testing.assert_array_equal(v, alone[k].numpy())
        np.testing.assert_allclose(v, expected[k], atol=1e-6)
    assert metrics["clients_accepted"] == 2
    assert metrics["clients_rejected"] == 8
    assert metrics["bytes_up"] == nbytes and metrics["bytes_down"] == nbytes


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"num-examples": 0}, "'num-examples' must be a positive number, got 0"),
        ({"num-examples": float("nan")}, "must be a positive number, got nan"),
        ({"num-examples": [1, 2]}, "must be a positive number, got [1, 2]"),
        ({"train_loss": 1.0}, "must be a positive number, got None"),
    ],
)
def test_replies_without_a_positive_weight_are_dropped(caplog, metrics, reason):
    arrays = lora_arrays(np.random.default_rng(11), 2)
    request = Message(content=RecordDict(), dst_node_id=5, message_type="train")
    bad = Message(
        RecordDict({"arrays": record(arrays), "metrics": MetricRecord(metrics)}),
        reply_to=request,
    )
    with caplog.at_level(logging.WARNING):
        kept = valid_train_replies([bad, reply(6, arrays, 3)], record(arrays))
    assert [m.metadata.src_node_id for m in kept] == [6]
    assert "node 5: " in caplog.text and reason in caplog.text


def test_reply_records_must_be_one_arrayrecord_and_one_metricrecord(caplog):
    arrays = lora_arrays(np.random.default_rng(12), 2)
    request = Message(content=RecordDict(), dst_node_id=5, message_type="train")
    two_metrics = Message(
        RecordDict(
            {
                "arrays": record(arrays),
                "metrics": MetricRecord({"num-examples": 1}),
                "more": MetricRecord({"x": 1.0}),
            }
        ),
        reply_to=request,
    )
    with caplog.at_level(logging.WARNING):
        assert valid_train_replies([two_metrics], record(arrays)) == []
    assert (
        "node 5: expected exactly one ArrayRecord and one MetricRecord, got 1 and 2"
        in caplog.text
    )


def test_replies_with_odd_metric_keys_are_dropped_instead_of_crashing_flower(caplog):
    """Flower's FedAvg raises (ending the run) when MetricRecords have different keys."""
    rng = np.random.default_rng(13)
    arrays = lora_arrays(rng, 2)
    strategy = FedAvgLoRA()
    send(strategy, arrays)
    replies = [reply(1, arrays, 1), reply(2, arrays, 1), reply(3, arrays, 1, bleu=0.5)]
    with caplog.at_level(logging.WARNING):
        _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients_accepted"] == 2
    assert "node 3: its metric keys" in caplog.text


def test_nothing_valid_returns_none(caplog):
    arrays = lora_arrays(np.random.default_rng(14), 2)
    strategy = FedAvgLoRA()
    send(strategy, arrays)
    with caplog.at_level(logging.WARNING):
        assert strategy.aggregate_train(3, [error_reply(1), error_reply(2)]) == (None, None)
    assert "none of the 2 replies of round 3 is valid" in caplog.text


def test_aggregate_before_configure_is_a_clear_error():
    with pytest.raises(RuntimeError, match="call configure_train first"):
        FedAvgLoRA().aggregate_train(1, [])


def test_arrayrecord_nbytes():
    rec = record({"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float64)})
    assert arrayrecord_nbytes(rec) == 3 * 4 * 4 + 5 * 8


# --- build_strategy ----------------------------------------------------------


def test_build_strategy():
    assert type(build_strategy("fedavg_lora")) is FedAvgLoRA
    ffa = build_strategy("ffa_lora", target_rank=8, lora_alpha=ALPHA, min_train_nodes=3)
    assert type(ffa) is FFALoRA and ffa.min_train_nodes == 3
    svd = build_strategy("svd_lora", target_rank=8, lora_alpha=ALPHA, max_update_bytes=10)
    assert type(svd) is SVDLoRA
    assert (svd.target_rank, svd.lora_alpha, svd.max_update_bytes) == (8, ALPHA, 10)
    with pytest.raises(ValueError, match=r"'fedadam'.*fedavg_lora, ffa_lora, svd_lora"):
        build_strategy("fedadam")
    with pytest.raises(TypeError, match="target_rank"):
        build_strategy("svd_lora", lora_alpha=ALPHA)


# --- a whole run through Flower's Strategy.start --------------------------------


class LoopbackGrid(FakeGrid):
    """Answers every message in-process: clients of the given LoRA ranks, one failing."""

    def __init__(self, ranks, failing_node):
        super().__init__(ranks)  # node id == its rank
        self.failing_node = failing_node

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node == self.failing_node:
                replies.append(Message(Error(code=1, reason="crashed"), reply_to=msg))
                continue
            metrics = MetricRecord({"num-examples": node, "loss": 1.0 / node})
            content = RecordDict({"metrics": metrics})
            if msg.metadata.message_type == "train":
                # Keep the first `node` components (this client's rank), then "train".
                content["arrays"] = record(
                    {
                        k: (v[:node] if ".lora_A." in k else v[:, :node]) + 0.01
                        for k, v in as_numpy(msg.content["arrays"]).items()
                    }
                )
            replies.append(Message(content, reply_to=msg))
        return replies


def test_svd_lora_runs_in_strategy_start_with_mixed_ranks_and_a_crash():
    rng = np.random.default_rng(15)
    strategy = SVDLoRA(target_rank=8, lora_alpha=ALPHA, min_available_nodes=1)
    result = strategy.start(
        grid=LoopbackGrid(ranks=[2, 4, 8, 3], failing_node=3),
        initial_arrays=record(lora_arrays(rng, 8)),
        num_rounds=2,
    )
    for server_round in (1, 2):
        train = result.train_metrics_clientapp[server_round]
        assert (train["clients_accepted"], train["clients_rejected"]) == (3, 1)
        assert "loss" in result.evaluate_metrics_clientapp[server_round]
    assert {a.shape for a in result.arrays.values()} == {(8, IN), (OUT, 8)}
