"""Label leakage in split training (Li et al., ICLR 2022): the attacks, the defences,
and the audit on the gradients our server actually receives."""

from __future__ import annotations

import math

import pytest
import torch
from test_server_rounds import LoopbackGrid

from common.config import ConfigError, load_config
from fl_server.rounds import run_federated
from privacy.label_leakage import leakage_aucs
from privacy.split_defences import gaussian_gradient_noise, randomized_response


def linear_bce_gradients(n: int = 400, seed: int = 0):
    """Gradients w.r.t. the cut of a logistic top layer: g_i = (sigmoid(x_i w) - y_i) w."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen, requires_grad=True)
    w = torch.randn(8, generator=gen)
    y = (torch.rand(n, generator=gen) < 0.2).float()  # imbalanced, as in Li et al.
    torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y, reduction="sum").backward()
    return x.grad, y.long()


def test_direction_attack_exposes_every_label_of_a_linear_bce_top_layer():
    grads, labels = linear_bce_gradients()
    aucs = leakage_aucs(grads, labels, num_classes=2)
    assert aucs["leak_cosine_auc_class1"] == 1.0 and aucs["leak_cosine_auc_class0"] == 1.0
    # The norm attack needs a trained, confident model (Li et al.): here, at random
    # weights, both classes have gradients of the same size.
    assert 0.4 < aucs["leak_norm_auc"] < 0.6


def test_gaussian_noise_on_the_returned_gradient_lowers_the_leakage():
    grads, labels = linear_bce_gradients()
    scale = grads.norm(dim=1).mean().item()
    noisy = gaussian_gradient_noise(grads, 3 * scale, torch.Generator().manual_seed(1))
    assert leakage_aucs(noisy, labels, 2)["leak_cosine_auc"] < 0.8
    # No noise is no change (the defence's default leaves training exact).
    assert torch.equal(gaussian_gradient_noise(grads, 0.0, torch.Generator()), grads)


def test_random_scores_leak_nothing():
    gen = torch.Generator().manual_seed(2)
    grads, labels = torch.randn(4000, 16, generator=gen), torch.randint(0, 4, (4000,), generator=gen)
    aucs = leakage_aucs(grads, labels, 4)
    assert abs(aucs["leak_cosine_auc"] - 0.5) < 0.03 and abs(aucs["leak_norm_auc"] - 0.5) < 0.03


def test_randomized_response_keeps_each_label_with_the_rr_probability():
    labels = torch.randint(0, 4, (40_000,), generator=torch.Generator().manual_seed(3))
    noisy = randomized_response(labels, 4, 1.0, torch.Generator().manual_seed(4))
    keep = math.e / (math.e + 3)
    assert abs((noisy == labels).float().mean().item() - keep) < 0.01
    flipped = noisy[noisy != labels] - labels[noisy != labels]
    shares = torch.bincount(flipped % 4, minlength=4)[1:].float() / len(flipped)
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.02)  # the others, uniformly


def audited_split(tmp_path, name, *overrides):
    cfg = load_config("configs/quickstart.yaml", [
        "num_clients=2", "min_train_clients=2", "rounds=1", "fraction_evaluate=0",
        "data.num_samples=240", "train.batch_size=16", "split.mode=parallel",
        "split.steps_per_round=5", "privacy.label_leakage.audit=true", f"output_dir={tmp_path}",
        *overrides,
    ])
    return run_federated(LoopbackGrid(2), cfg, tmp_path / name)["rounds"][0]


def test_the_server_sees_labels_in_split_gradients_and_the_defences_hide_them(
        tmp_path, flower_message_context):
    plain = audited_split(tmp_path, "plain")
    classes = [k for k in plain if k.startswith("leak_cosine_auc_class")]
    assert len(classes) == 4 and all(0.0 <= plain[k] <= 1.0 for k in classes)
    assert plain["leak_cosine_auc"] > 0.9  # the classification row gives the labels away
    unaudited = audited_split(tmp_path, "unaudited", "privacy.label_leakage.audit=false")
    assert unaudited["train_loss"] == plain["train_loss"]  # the audit only watches
    assert not any(k.startswith("leak_") for k in unaudited)
    label_dp = audited_split(tmp_path, "label_dp", "privacy.split_defence.label_epsilon=0.1")
    assert label_dp["leak_cosine_auc"] < plain["leak_cosine_auc"] - 0.2
    noise = audited_split(tmp_path, "noise", "privacy.split_defence.gradient_noise_std=0.05")
    assert noise["leak_cosine_auc"] < plain["leak_cosine_auc"] - 0.2


def test_privacy_settings_that_cannot_apply_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"privacy.label_leakage.audit.*split.mode"):
        load_config("configs/quickstart.yaml", ["privacy.label_leakage.audit=true"])
    with pytest.raises(ConfigError, match=r"privacy.split_defence.label_epsilon.*> 0"):
        load_config("configs/split_quickstart.yaml", ["privacy.split_defence.label_epsilon=0"])
    with pytest.raises(ConfigError, match=r"privacy.split_defence.gradient_noise_std.*>= 0"):
        load_config("configs/split_quickstart.yaml",
                    ["privacy.split_defence.gradient_noise_std=-1"])
