"""Secure aggregation (strategy.secure_aggregation, Flower's SecAgg+): the server holds
only masked updates and their sum, and the aggregate equals plain FedAvg up to the
quantisation error."""

import copy
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from test_server_rounds import LoopbackGrid

from common.config import ConfigError, load_config
from fl_server.loop import initial_arrays, lora_train_of, make_strategy
from fl_server.secagg import secure_train_round

BASE = ["num_clients=3", "rounds=1", "data.num_samples=180", "train.batch_size=16",
        "train.local_epochs=1", "fraction_evaluate=0"]


class WireGrid(LoopbackGrid):
    """A LoopbackGrid that delivers copies, as a real wire does: SecAgg+ sends one
    content object to several nodes, and each node's mod consumes its copy."""

    def send_and_receive(self, messages, *, timeout=None):
        wire = [Message(copy.deepcopy(m.content), dst_node_id=m.metadata.dst_node_id,
                        message_type=m.metadata.message_type) for m in messages]
        return super().send_and_receive(wire, timeout=timeout)


def round_config(cfg):
    return ConfigRecord({"experiment": cfg.to_json(), "run-key": "secagg-test"})


def test_the_server_sees_masked_updates_and_their_sum_only(flower_message_context, capsys):
    plain_cfg = load_config("configs/quickstart.yaml", BASE)
    cfg = load_config("configs/quickstart.yaml", [*BASE, "strategy.secure_aggregation=true"])
    # Plain FedAvg of the same round (same seeds: the clients train the same updates).
    strategy = make_strategy(plain_cfg)
    arrays = initial_arrays(plain_cfg, lora_train_of(strategy))
    t0 = time.perf_counter()
    messages = list(strategy.configure_train(1, arrays, round_config(plain_cfg), WireGrid(3)))
    plain_replies = WireGrid(3).send_and_receive(messages)
    plain_seconds = time.perf_counter() - t0
    plain, plain_metrics = strategy.aggregate_train(1, plain_replies)
    updates = [np.concatenate([a.numpy().ravel() for a in r.content["arrays"].values()])
               for r in plain_replies]

    t0 = time.perf_counter()
    strategy = make_strategy(cfg)
    secure, metrics, clients, replies = secure_train_round(
        WireGrid(3), strategy, cfg, 1, arrays, round_config(cfg))
    secure_seconds = time.perf_counter() - t0
    assert clients == 3 and secure is not None

    # The aggregate is FedAvg's within the quantisation error (and went through it).
    diff = max(float(np.abs(secure[k].numpy() - plain[k].numpy()).max()) for k in plain.keys())
    assert 0 < diff < 1e-4, diff
    assert metrics["train_loss"] == pytest.approx(plain_metrics["train_loss"], rel=1e-9)

    # What the server held: keys, encrypted shares and masked vectors; no update.
    masked = []
    for reply in replies:
        assert not reply.has_error(), reply.error
        assert all(len(r) == 0 for r in reply.content.array_records.values())
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        blobs = [b for v in record.values() for b in (v if isinstance(v, list) else [v])
                 if isinstance(b, bytes)]
        for update in updates:
            assert not any(update[:16].tobytes() in b for b in blobs)
        if Key.MASKED_PARAMETERS in record:
            masked.append(np.concatenate([bytes_to_ndarray(b).ravel().astype(np.float64)
                                          for b in record[Key.MASKED_PARAMETERS]]))
    assert len(masked) == 3
    for vector in masked:  # uniform on [0, 2**32): uncorrelated with every update
        assert vector.mean() == pytest.approx(2**31, rel=0.05)
        n = min(len(vector), len(updates[0]))
        for update in updates:
            assert abs(np.corrcoef(vector[:n], update[:n])[0, 1]) < 0.1
    with capsys.disabled():
        print(f"\nSecAgg+ round, 3 clients in process: {secure_seconds:.1f} s "
              f"(plain {plain_seconds:.1f} s), {metrics['secagg_exchanges']:.0f} exchanges, "
              f"{metrics['bytes_up']:.0f} B up per client (plain "
              f"{plain_metrics['bytes_up']:.0f} B), max deviation from FedAvg {diff:.2e}")


@pytest.mark.parametrize("override, words", [
    ("strategy.name=svd_lora", ["strategy.secure_aggregation", "weighted mean", "svd_lora"]),
    ("strategy.name=krum_lora", ["strategy.secure_aggregation", "krum_lora"]),
    ("split.mode=parallel", ["strategy.secure_aggregation", "split"]),
    ("strategy.max_update_bytes=100", ["strategy.secure_aggregation", "max_update_bytes"]),
    ("min_train_clients=1", ["'min_train_clients'", "secure_aggregation"]),
])
def test_what_secagg_cannot_carry_is_refused_with_the_reason(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("configs/quickstart.yaml", ["strategy.secure_aggregation=true", override])
    for w in words:
        assert w in str(err.value)


def test_central_dp_and_secagg_are_refused_together():
    with pytest.raises(ConfigError, match="privacy.dp.mode=central"):
        load_config("configs/quickstart.yaml", [
            "strategy.secure_aggregation=true", "privacy.dp.mode=central",
            "privacy.dp.noise_multiplier=1.0"])
