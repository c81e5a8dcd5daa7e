"""Membership-inference attacks (privacy/mia.py) and the audit of finished runs
(reports/membership.py): calibration on simulated signals, a positive control that must be
caught, a DP-SGD model whose attacks stay inside the DP bound, and the refusals; on the
synthetic scenes and on a real source (scikit-learn's digits), whose members and
non-members come from the indices the clients recorded."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from scipy.stats import beta, norm
from test_server_rounds import LoopbackGrid

from common import data
from common.config import load_config
from fl_server.rounds import run_federated
from models.client_state import DATA_INDICES_FILE, read_data_record
from privacy import mia
from privacy.mia_metrics import attack_auc
from reports.membership import (
    AuditError,
    audit,
    parse_attacks,
    population,
    recorded_candidates,
    reference_halves,
)
from reports.runs import RunFolderError, client_state_folder, finished_run


def _simulated(n=4000, k=32, shift=1.0, seed=0):
    """Per-example difficulty mu_i varies widely; training on an example adds `shift`."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 5, n)
    ref_in = reference_halves(n, k, seed)
    ref_phi = mu + shift * ref_in + rng.normal(0, 1, (k, n))
    member = rng.random(n) < 0.5
    target_phi = mu + shift * member + rng.normal(0, 1, n)
    return target_phi, ref_phi, ref_in, member


def test_lira_calibrates_each_examples_difficulty():
    target_phi, ref_phi, ref_in, member = _simulated()
    optimum = norm.cdf(1 / math.sqrt(2))  # AUC of N(1,1) against N(0,1): 0.760
    assert attack_auc(target_phi, member) < 0.6  # the raw confidence hides the shift
    for fixed in (False, True):
        online = mia.lira_scores(target_phi, ref_phi, ref_in, online=True, fixed_variance=fixed)
        offline = mia.lira_scores(target_phi, ref_phi, ref_in, online=False,
                                  fixed_variance=fixed)
        assert abs(attack_auc(online, member) - optimum) < 0.03
        assert abs(attack_auc(offline, member) - optimum) < 0.03


def test_rmia_calibrates_each_examples_difficulty():
    target_phi, ref_phi, ref_in, member = _simulated(seed=1)
    p = lambda phi: 1 / (1 + np.exp(-phi))  # noqa: E731 - probability from logit scale
    rng = np.random.default_rng(2)
    mu_z = rng.normal(0, 5, 500)
    pop_target, pop_ref = p(mu_z + rng.normal(0, 1, 500)), p(mu_z + rng.normal(0, 1, (32, 500)))
    online = mia.rmia_scores(p(target_phi), p(ref_phi), ref_in, pop_target, pop_ref)
    assert attack_auc(online, member) > 0.7 > attack_auc(p(target_phi), member) + 0.1
    a = mia.fit_rmia_a(p(ref_phi), ref_in, pop_ref)
    offline = mia.rmia_scores(p(target_phi), p(ref_phi), ref_in, pop_target, pop_ref,
                              offline_a=a)
    assert attack_auc(offline, member) > 0.7


def test_reference_models_pair_up_on_complementary_halves():
    ref_in = reference_halves(101, 6, seed=3)
    assert (ref_in.sum(0) == 3).all()  # every example IN for exactly K/2 models
    assert (ref_in[0] ^ ref_in[1]).all()
    with pytest.raises(AuditError, match="--references 3: give an even number"):
        reference_halves(10, 3, 0)


def _finished_run(root, teacher, *overrides):
    """A tosc run of one client (so the target is exactly what the client trained)."""
    cfg = load_config("configs/distill_quickstart.yaml", [
        "num_clients=1", "min_train_clients=1", "rounds=1", "data.num_samples=200",
        "data.partitioner=iid", "distill.kd_weight=0", "channel.sweep_snr_db=[]",
        "distill.teacher.public_samples=40", "distill.teacher.epochs=1",
        f"distill.teacher.checkpoint={teacher}", f"output_dir={root}", *overrides])
    grid = LoopbackGrid(1)
    for context in grid.contexts.values():
        context.node_config["state-dir"] = str(root / "node-state")
    run_federated(grid, cfg, root / "run")
    return root / "run", root / "node-state"


def _module_run(root, teacher, *overrides):
    """`_finished_run` for a module fixture (flower_message_context is per test)."""
    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as mp:  # as the flower_message_context fixture
        for attr in ("_run_id", "_node_id", "_task_id"):
            mp.setattr(TaskIdentity, attr, 1)
        return _finished_run(root, teacher, *overrides)


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, pretrained_dir):
    return _module_run(tmp_path_factory.mktemp("overfit"),
                       pretrained_dir / "teacher-40-public.pt", "train.local_epochs=80")


def test_positive_control_an_overfit_target_is_caught(overfit_run):
    run, state = overfit_run
    # 160 members, 240 non-members: TPR at 5 % FPR is about the lowest FPR they resolve.
    report = audit(run, "global", references=4, non_member_ratio=1.5, population_size=300,
                   fprs=(0.05,), state_dir=state)
    assert report["member_accuracy"] > report["non_member_accuracy"] + 0.2  # it did overfit
    attacks = report["attacks"]
    assert attacks["loss"]["auc"] > 0.7
    loss_tpr = attacks["loss"]["tpr_at_fpr_0.05"]
    lira = attacks["lira-online (fixed variance)"]
    rmia = attacks["rmia-online"]
    assert lira["tpr_at_fpr_0.05"] >= loss_tpr and rmia["tpr_at_fpr_0.05"] >= loss_tpr
    saved = json.loads((run / "audit-global" / "audit.json").read_text())
    assert saved["attacks"]["loss"]["auc"] == attacks["loss"]["auc"]
    assert (run / "audit-global" / "roc.png").stat().st_size > 10_000


def test_a_dp_sgd_target_stays_inside_the_dp_bound(tmp_path, pretrained_dir,
                                                  flower_message_context):
    run, state = _finished_run(tmp_path, pretrained_dir / "teacher-40-public.pt",
                               "train.local_epochs=20", "privacy.dp.mode=local",
                               "privacy.dp.epsilon=1.0")
    report = audit(run, "global", attacks="loss,lira", references=4, fprs=(0.1,),
                   state_dir=state)
    eps, delta = report["dp_epsilon"], report["delta"]
    assert eps == pytest.approx(1.0, abs=0.02)
    scores_checked = 0
    members = non_members = 160
    for name, row in report["attacks"].items():
        # TPR <= e^eps FPR + delta at every threshold, up to the confidence intervals:
        # the Clopper-Pearson lower bound on epsilon never passes the true epsilon...
        assert row["empirical_epsilon"] <= eps, name
        # ... and at FPR 10 % the TPR's lower bound stays under the bound at FPR's upper one.
        k = round(row["tpr_at_fpr_0.1"] * members)
        tpr_low = beta.ppf(0.025, k, members - k + 1) if k else 0.0
        fp = round(0.1 * non_members)
        fpr_high = beta.ppf(0.975, fp + 1, non_members - fp)
        assert tpr_low <= math.exp(eps) * fpr_high + delta, name
        scores_checked += 1
    assert scores_checked == 3


def test_bad_requests_are_refused_with_the_fix(tmp_path, overfit_run):
    run, state = overfit_run
    with pytest.raises(AuditError, match=r"--attacks 'loss,shokri': unknown \['shokri'\]"):
        parse_attacks("loss,shokri")
    with pytest.raises(RunFolderError, match="no metrics.json"):
        audit(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "running", "config": {}}))
    with pytest.raises(RunFolderError, match="did not finish"):
        audit(tmp_path)
    with pytest.raises(AuditError, match=r"--fpr 0.001 needs at least 10000 non-members"):
        audit(run, attacks="loss", fprs=(0.001,), state_dir=state)
    with pytest.raises(AuditError, match=r"--references 2: fitting RMIA's offline a"):
        audit(run, attacks="rmia", references=2, state_dir=state)
    with pytest.raises(AuditError, match=r"--target 'client:5'"):
        audit(run, target="client:5", attacks="loss", state_dir=state)
    with pytest.raises(RunFolderError, match="no saved private state"):
        audit(run, attacks="loss")  # not where this run's node kept it


def test_tpr_is_reported_only_where_the_non_members_resolve_it(overfit_run):
    run, state = overfit_run
    report = audit(run, "client:0", attacks="loss", state_dir=state)
    row = report["attacks"]["loss"]
    assert row["tpr_at_fpr_0.01"] == "n/a" and "non-members" in row["tpr_at_fpr_0.01_why"]
    assert 0.5 < row["auc"] <= 1.0


def test_the_privacy_report_row_takes_the_best_attack_and_says_what_it_cannot_measure():
    from reports.privacy import markdown_table, summarise

    result = {"rounds": [{"accuracy": 0.7, "majority_class_share": 0.5,
                          "dp_central_epsilon": 19.1}]}
    audit_json = {"target": "global", "members": 100, "non_members": 100,
                  "member_accuracy": 0.9, "non_member_accuracy": 0.6, "attacks": {
                      "loss": {"auc": 0.61, "tpr_at_fpr_0.01": "n/a", "empirical_epsilon": 0.2},
                      "rmia-online": {"auc": 0.64, "tpr_at_fpr_0.01": "n/a",
                                      "empirical_epsilon": 0.3}}}
    row = summarise("central DP", result, audit_json)
    assert row["mia_best_attack"] == "rmia-online" and row["mia_tpr_at_1pct_best"] == "n/a"
    table = markdown_table([row])
    assert "| 19.10 (central) | global (100) | 0.640 (rmia-online) | n/a | 0.30 | - |" in table


# --------------------------------------------------------------------------- a real source

# scikit-learn's 1797 digits: 100 for the client (80 train, 20 test), 40 public, 1657 held
# out. Digits generalise well, so the student is made to memorise: few examples, no
# channel noise and no information bottleneck to regularise it.
DIGITS = ("data.name=digits", "data.num_samples=100", "data.image_size=16",
          "channel.snr_range_db=[20,20]", "distill.beta=0")
DIGITS_TEACHER = "teacher-digits-100-16px-40-public.pt"


@pytest.fixture(scope="module")
def digits_overfit_run(tmp_path_factory, pretrained_dir):
    return _module_run(tmp_path_factory.mktemp("digits-overfit"),
                       pretrained_dir / DIGITS_TEACHER, *DIGITS, "train.local_epochs=150")


def test_members_and_non_members_of_a_real_source_come_from_the_recorded_indices(
        digits_overfit_run):
    run, state = digits_overfit_run
    cfg, _ = finished_run(run)
    record = read_data_record(client_state_folder(cfg, run, 0, state))
    assert record["source"] == "digits" and len(record["train"]) == 80
    cands = recorded_candidates(cfg, run, [0], 3.0, state)
    members, non_members = cands.index[cands.is_member], cands.index[~cands.is_member]
    assert members.tolist() == record["train"]
    assert len(non_members) == len(set(non_members.tolist())) == 240
    assert not set(non_members.tolist()) & set(record["train"])
    public = data.public_indices(cfg.data, 40, "distill.teacher.public_samples")
    assert not np.isin(non_members, public).any()
    # The client's own test examples first, then the source's held-out tail.
    assert set(record["test"]) <= set(non_members.tolist())
    tail = non_members[~np.isin(non_members, record["test"])]
    assert np.isin(tail, data.held_out_pool(cfg.data, 40)).all()
    labels = data.sources.get_source(cfg.data).labels
    assert (cands.data.tensors["label"].numpy() == labels[cands.index]).all()
    assert (np.bincount(labels[non_members], minlength=10)
            == 3 * np.bincount(labels[members], minlength=10)).all()
    # RMIA's population: held-out examples that are not candidates.
    pop = population(cfg, cands, 300)
    assert len(pop) >= 295 and not np.isin(pop.indices, cands.index).any()
    assert np.isin(pop.indices, data.held_out_pool(cfg.data, 40)).all()


def test_positive_control_on_a_real_source(digits_overfit_run):
    run, state = digits_overfit_run
    # 80 members, 240 non-members: TPR at 5 % FPR is about the lowest FPR they resolve.
    report = audit(run, "global", references=4, non_member_ratio=3, population_size=300,
                   fprs=(0.05,), state_dir=state)
    assert report["data"] == "digits" and report["members"] == 80
    assert report["member_accuracy"] > report["non_member_accuracy"] + 0.1  # it did overfit
    best = max(row["auc"] for row in report["attacks"].values())
    assert best > 0.7, report["attacks"]


def test_a_dp_sgd_target_on_a_real_source_stays_inside_the_dp_bound(tmp_path, pretrained_dir,
                                                                   flower_message_context):
    run, state = _finished_run(tmp_path, pretrained_dir / DIGITS_TEACHER, *DIGITS,
                               "train.local_epochs=20", "privacy.dp.mode=local",
                               "privacy.dp.epsilon=1.0")
    report = audit(run, "global", references=4, non_member_ratio=3, population_size=300,
                   fprs=(0.1,), state_dir=state)
    eps = report["dp_epsilon"]
    assert eps == pytest.approx(1.0, abs=0.02)
    assert len(report["attacks"]) == 5
    for name, row in report["attacks"].items():
        assert row["auc"] <= 0.6, name
        assert row["empirical_epsilon"] <= eps, name


def test_a_real_source_too_small_for_the_ratio_or_population_is_refused(digits_overfit_run):
    run, state = digits_overfit_run
    with pytest.raises(AuditError, match=r"--non-member-ratio 25: 80 members need 2000 "
                       r"non-members.*data.name=digits has 1797 examples: 100 for the clients "
                       r"\(data.num_samples=100\), 40 for the public split, 1657 held out: lower "
                       r"--non-member-ratio to \d+\.\d\d or less, or rerun with a lower "
                       r"data.num_samples"):
        audit(run, attacks="loss", non_member_ratio=25, state_dir=state)
    with pytest.raises(AuditError, match=r"--population 2000: RMIA's population needs.*"
                       r"lower --population to \d+ or less"):
        audit(run, attacks="rmia", non_member_ratio=3, population_size=2000, state_dir=state)


def test_a_real_source_run_without_its_data_record_or_with_changed_files_is_refused(
        tmp_path, digits_overfit_run):
    run, state = digits_overfit_run
    copy = tmp_path / "node-state"
    shutil.copytree(state, copy)
    record = next(copy.rglob(DATA_INDICES_FILE))
    saved = json.loads(record.read_text())
    record.write_text(json.dumps({**saved, "fingerprint": "digits 0000000000000000"}))
    with pytest.raises(AuditError, match=r"partition 0: .*names the examples of 'digits "
                       r"0000000000000000'.*the source's files changed since the run"):
        audit(run, attacks="loss", state_dir=copy)
    record.unlink()
    with pytest.raises(AuditError, match=r"partition 0: no data-indices.json in .*rerun"):
        audit(run, attacks="loss", state_dir=copy)
