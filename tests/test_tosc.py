"""The tosc workload: IB and KD losses against hand computations, pre-stored teacher
outputs against fresh ones, the seam's privacy boundary, FedProx, and a small
federated distillation run (in process, no Ray) in which the students learn."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from common.config import ConfigError, load_config
from common.data import load_partition
from fl_server.rounds import run_federated
from models.tosc import losses as tosc_losses
from models.tosc import teacher as tosc_teacher
from models.tosc import workload as tosc
from strategies import StudentFedAvg, StudentFedProx, build_strategy
from tests.test_server_rounds import LoopbackGrid


def tosc_cfg(checkpoint, *extra):
    return load_config("configs/distill_quickstart.yaml", [
        "num_clients=3", "rounds=8", "data.num_samples=1200", "data.partitioner=iid",
        "train.local_epochs=3", "distill.teacher.public_samples=240",
        "distill.teacher.epochs=2", f"distill.teacher.checkpoint={checkpoint}",
        "channel.sweep_snr_db=[0, 20]", *extra])


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """A tiny experiment whose (weak) teacher is trained once for the module."""
    cfg = tosc_cfg(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    tosc_teacher.ensure_teacher(cfg, log=lambda _: None)
    return cfg


# ----------------------------------------------------------------------------- losses


def test_information_bottleneck_kl_matches_the_closed_form():
    mu = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [math.log(0.5), 0.0]])
    # 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2) per dim, summed, then averaged over rows.
    row1 = 0.5 * (1 + 1 - 1 - 0) + 0.5 * (0 + 2 - 1 - math.log(2))
    row2 = 0.5 * (0 + 0.5 - 1 - math.log(0.5)) + 0.5 * (4 + 1 - 1 - 0)
    got = tosc_losses.information_bottleneck_kl(mu, logvar).item()
    assert got == pytest.approx((row1 + row2) / 2, abs=1e-6)
    assert tosc_losses.information_bottleneck_kl(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0


def test_distillation_kl_matches_a_hand_computation():
    t = 2.0
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.softmax(torch.tensor([[2.0, 0.0]]) / t, dim=-1)
    p = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]  # softmax([1, 0])
    expected = t ** 2 * sum(pi * math.log(pi / 0.5) for pi in p)  # q = [0.5, 0.5]
    assert tosc_losses.distillation_kl(student, teacher, t).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.44378, abs=1e-5)
    # A student that already agrees with the teacher pays nothing.
    same = torch.tensor([[2.0, 0.0]])
    assert tosc_losses.distillation_kl(same, teacher, t).item() == pytest.approx(0.0, abs=1e-7)


def test_softened_topk_keeps_the_top_logits_and_zeros_the_rest():
    values = torch.tensor([[3.0, 1.0]], dtype=torch.float16)
    indices = torch.tensor([[2, 0]], dtype=torch.uint8)
    probs = tosc_losses.softened_topk(values, indices, 4, temperature=2.0)
    e = [math.exp(1.5), math.exp(0.5)]
    assert probs[0].tolist() == pytest.approx([e[1] / sum(e), 0.0, e[0] / sum(e), 0.0])


# ----------------------------------------------------------------------------- pre-stored outputs


def test_stored_teacher_outputs_equal_fresh_ones_within_fp16(cfg):
    train, _ = load_partition(cfg.data, 0, cfg.num_clients)
    stored, seconds = tosc_teacher.prestored_teacher_outputs(cfg, train)
    again, seconds_again = tosc_teacher.prestored_teacher_outputs(cfg, train)
    assert seconds > 0 and seconds_again == 0.0  # computed once, then read back
    np.testing.assert_array_equal(stored.topk_values, again.topk_values)
    assert stored.topk_values.dtype == np.float16 and stored.topk_indices.dtype == np.uint8
    assert stored.nbytes == len(train) * cfg.distill.top_k * 3  # 2 bytes value + 1 index

    logits, _ = tosc_teacher.teacher_logits_features(tosc_teacher.load_teacher(cfg), train.tensors["image"], cfg.channel)
    fresh = logits.topk(cfg.distill.top_k, dim=-1)
    np.testing.assert_array_equal(stored.topk_indices, fresh.indices.numpy())
    np.testing.assert_allclose(stored.topk_values.astype(np.float32), fresh.values.numpy(),
                               rtol=2 ** -10, atol=1e-3)  # float16 keeps 11 bits


def test_stored_teacher_features_equal_fresh_ones_within_fp16(cfg):
    with_features = tosc_cfg(cfg.distill.teacher.checkpoint, "distill.feature_weight=0.5")
    _, test = load_partition(cfg.data, 2, cfg.num_clients)  # any dataset of the client
    stored, _ = tosc_teacher.prestored_teacher_outputs(with_features, test)
    _, features = tosc_teacher.teacher_logits_features(tosc_teacher.load_teacher(cfg), test.tensors["image"], cfg.channel)
    assert stored.features.dtype == np.float16 and stored.features.shape == features.shape
    np.testing.assert_allclose(stored.features.astype(np.float32), features.numpy(),
                               rtol=2 ** -10, atol=1e-3)


def test_a_teacher_checkpoint_for_other_settings_is_refused(cfg):
    other = tosc_cfg(cfg.distill.teacher.checkpoint, "distill.teacher.hidden=128")
    with pytest.raises(ValueError, match="teacher.*Delete it to retrain"):
        tosc_teacher.load_teacher(other)
    missing = tosc_cfg("no/such/teacher.pt")
    with pytest.raises(FileNotFoundError, match="no/such/teacher.pt"):
        tosc_teacher.load_teacher(missing)


# ----------------------------------------------------------------------------- the seam


def test_shared_state_is_the_student_without_its_head(cfg):
    model = tosc.build(cfg)
    shared = tosc.shared_state(model)
    assert shared and not any(k.startswith("head.") for k in shared)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable - set(shared) == {"head.weight", "head.bias"}
    other = tosc.build(cfg)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    tosc.load_shared_state(other, shared)
    for name, p in other.named_parameters():
        same = torch.equal(p, dict(model.named_parameters())[name])
        assert same == (not name.startswith("head."))  # the head stays local
    with pytest.raises(KeyError):
        tosc.load_shared_state(other, {"head.weight": np.zeros((4, 64), np.float32)})


def test_fedprox_keeps_the_student_closer_to_the_global_weights(cfg):
    train, _ = load_partition(cfg.data, 1, cfg.num_clients)
    start = tosc.shared_state(tosc.build(cfg))

    def drift(*overrides):
        c = tosc_cfg(cfg.distill.teacher.checkpoint, "train.local_epochs=1", *overrides)
        model = tosc.build(c)
        tosc.train_local(model, train, c, seed=3)
        end = tosc.shared_state(model)
        return sum(float(((end[k] - start[k]) ** 2).sum()) for k in start)

    assert drift("strategy.name=fedprox", "strategy.proximal_mu=1.0") < 0.8 * drift()


def test_student_strategies_are_flowers_fedavg_and_fedprox():
    from flwr.serverapp.strategy import FedAvg, FedProx

    fedavg = build_strategy("fedavg", proximal_mu=0.5, target_rank=4, lora_alpha=8.0)
    fedprox = build_strategy("fedprox", proximal_mu=0.5, target_rank=4, lora_alpha=8.0)
    assert type(fedavg) is StudentFedAvg and isinstance(fedavg, FedAvg)
    assert type(fedprox) is StudentFedProx and isinstance(fedprox, FedProx)
    assert fedprox.proximal_mu == 0.5


def test_fedprox_sends_proximal_mu_and_drops_bad_replies(flower_message_context):
    from flwr.app import Array, ArrayRecord

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    strategy = build_strategy("fedprox", proximal_mu=0.1, min_available_nodes=2,
                              min_train_nodes=2)
    arrays = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    sent = list(strategy.configure_train(1, arrays, ConfigRecord({}), Grid()))
    assert all(m.content["config"]["proximal-mu"] == 0.1 for m in sent)

    def reply(msg, value):
        content = RecordDict({"arrays": ArrayRecord({"w": Array(np.full(3, value, np.float32))}),
                              "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=msg)

    new, metrics = strategy.aggregate_train(1, [reply(sent[0], 3.0), reply(sent[1], np.nan)])
    np.testing.assert_allclose(new["w"].numpy(), 3.0)
    assert metrics["clients_rejected"] == 1


def test_config_errors_name_the_key_and_the_fix():
    base = ["workload=tosc", "model.tasks=[classification]"]
    with pytest.raises(ConfigError, match="strategy.name.*'fedavg' or 'fedprox'"):
        load_config("configs/quickstart.yaml", base)
    with pytest.raises(ConfigError, match="distill.latent_dim.*even"):
        load_config("configs/distill_quickstart.yaml", ["distill.latent_dim=5"])
    with pytest.raises(ConfigError, match="distill.top_k"):
        load_config("configs/distill_quickstart.yaml", ["distill.top_k=9"])
    # A real source's class count is checked once the source is read (check_source).
    assert load_config("configs/distill_quickstart.yaml",
                       ["data.name=digits", "distill.top_k=9"]).distill.top_k == 9


def test_the_config_checks_synthetic_class_count_is_the_scenes():
    from common.data.scenes import CLASSES
    from models.tosc.config import SYNTHETIC_CLASSES

    assert SYNTHETIC_CLASSES == len(CLASSES)
    with pytest.raises(ConfigError, match="proximal_mu.*fedprox"):
        load_config("configs/distill_quickstart.yaml", ["strategy.proximal_mu=0.1"])
    with pytest.raises(ConfigError, match="strategy.name.*workload 'mtsc'"):
        load_config("configs/quickstart.yaml", ["strategy.name=fedavg"])


# ----------------------------------------------------------------------------- federated


def test_federated_distillation_learns_well_above_chance(cfg, flower_message_context,
                                                         tmp_path):
    results = run_federated(LoopbackGrid(cfg.num_clients), cfg, tmp_path / "run")
    rounds = results["rounds"]
    first, last = rounds[0], rounds[-1]
    assert all(r["clients_accepted"] == 3 and r["clients_rejected"] == 0 for r in rounds)
    assert last["loss_kd"] > 0 and last["loss_ib"] > 0
    assert first["teacher_seconds"] > 0 and last["teacher_seconds"] == 0  # stored once
    assert last["teacher_store_bytes"] > 0
    assert last["accuracy"] > last["majority_class_share"] + 0.1, rounds
    assert last["accuracy"] > first["accuracy"]
    sweep = {row["snr_db"]: row["accuracy"] for row in results["snr_sweep"]}
    assert set(sweep) == {0.0, 20.0}
    assert sweep[20.0] > last["majority_class_share"] + 0.1


def test_evaluation_follows_the_configured_snr(cfg):
    """A model built for an SNR range is evaluated at the SNR of the evaluation config."""
    _, test = load_partition(cfg.data, 0, cfg.num_clients)
    teacher = tosc_teacher.load_teacher(cfg)  # built with channel.snr_range_db = [-5, 20]

    def at(snr):
        c = tosc_cfg(cfg.distill.teacher.checkpoint, "channel.snr_range_db=null",
                     f"channel.snr_db={snr}")
        return tosc.evaluate(teacher, test, c)["loss"]

    assert at(-30) != at(30)


def test_a_students_training_does_not_depend_on_whether_its_teacher_outputs_were_stored(
        tmp_path, one_torch_thread):
    """Computing the teacher's outputs (no store yet) iterates a DataLoader, which draws
    from the global random stream; reading them back does not. The student's training
    must not see the difference."""
    from tests.test_user_data_workloads import tosc_cfg

    cfg = tosc_cfg(["data.num_samples=96"], tmp_path / "teacher.pt", tmp_path, "num_clients=3")
    tosc.prepare(cfg)
    train, _ = tosc.load_data(cfg, 0, 3)
    states, spent = [], []
    for _ in range(2):  # the first computes and stores the outputs, the second reads them
        model = tosc.build(cfg, "cpu")
        spent.append(tosc.train_local(model, train, cfg, seed=5)["teacher_seconds"])
        states.append(model.state_dict())
    assert spent[0] > 0 and spent[1] == 0
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
