"""Membership-inference audit of a finished federated run.

    python -m reports.membership --run runs/<id> [--target global|client:<partition>]
        [--attacks loss,lira,rmia] [--references K] [--reference-epochs E]
        [--non-member-ratio R] [--population Z] [--fixed-variance] [--rmia-a A]

The target is what a client deploys after the last round: the global shared state
(adapters or student weights) with that client's private modules, read from its state
folder. `client:<p>` audits partition p's model; `global` audits every client's model
at once (each candidate scored by its own client's model, one ROC over all of them).

Members are the target's training examples; non-members are examples no client trained
on and no server pre-trained on, R per member, drawn with the members' class histogram
(a partition skews only the labels, so given its label a non-member comes from the
same distribution). The population RMIA compares against is Z more of them, disjoint
from the candidates. Where they come from depends on the source (common/data):

  synthetic scenes  members are the client's partition, rebuilt from the config;
                    non-members and population are fresh scenes far past every scene a
                    client or a teacher saw.
  a real source     members are the examples each audited client recorded as its
                    training set (<state dir>/<run key>/partition-<id>/data-indices.json,
                    written by fl_client); the record's source fingerprint must match the
                    source's files now. Non-members are the client's own recorded test
                    examples first, then the source's held-out tail (after the clients'
                    data.num_samples and the workload's public split), never an example
                    any client recorded; the population is what is left of that tail.
                    A source too small for R or Z is refused, naming the numbers (lower
                    data.num_samples for the next run, or R, or Z): the audit never falls
                    back to synthetic examples.

Reference models are trained by the same pipeline (the workload's `train_local`, same
config, DP-SGD included when the run used it) on paired complementary halves of the
candidates, so every candidate is IN for exactly K/2 of them. They train centrally for
E epochs (default rounds x local_epochs, what each client ran); the federated averaging
with the other clients is not replayed, so they approximate the target's training.

Writes `<run>/audit-<target>/audit.json` (AUC, TPR at each FPR or "n/a" with the reason,
empirical epsilon with Clopper-Pearson bounds, the train/held-out accuracy gap) and
`roc.png` (log-log ROC of every attack).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.config import ExperimentConfig
from common.data import (
    DataError,
    class_names,
    examples,
    held_out_pool,
    num_classes,
    source_fingerprint,
    source_size,
)
from common.data.scenes import HELD_OUT_START, SyntheticScenes, held_out_indices
from common.data.sources import get_source
from common.data.tensor_dataset import TensorDictDataset
from common.device import resolve_device
from common.records import plt
from models import get_workload
from models.client_state import DATA_INDICES_FILE, read_data_record
from models.seam import ClassLogits, PublicSplit
from privacy import mia
from privacy.dp import HISTORY_KEY, ClientDP, epsilon_of
from privacy.mia_metrics import TooFewNonMembers, attack_auc, empirical_epsilon, tpr_at_fpr
from reports.runs import (
    RunFolderError,
    client_state_folder,
    finished_run,
    restore_client,
    saved_client_state,
)

DEFAULT_FPRS = (0.01, 0.001)
POPULATION_START = 2 * HELD_OUT_START  # after every non-member the audit could draw


class AuditError(RunFolderError):
    """The audit cannot run as asked; the message names the value and the fix."""


@dataclasses.dataclass
class Candidates:
    data: TensorDictDataset
    is_member: np.ndarray  # bool [N]
    owner: np.ndarray  # int [N]: the partition whose model scores the example
    index: np.ndarray | None = None  # int [N]: each candidate's index into its source
    # A real source's held-out examples that are not candidates (RMIA's population).
    rest: np.ndarray | None = None


# --------------------------------------------------------------------------- the examples

def _concat(parts: list[TensorDictDataset]) -> TensorDictDataset:
    return TensorDictDataset({k: torch.cat([p.tensors[k] for p in parts])
                              for k in parts[0].tensors})


def _scenes_like(cfg: ExperimentConfig, like: TensorDictDataset, indices) -> SyntheticScenes:
    caption_len = like.tensors["caption"].shape[1] if "caption" in like.tensors else 12
    return SyntheticScenes(cfg.data, indices, caption_len)


def candidates(cfg: ExperimentConfig, pids: list[int], ratio: float) -> Candidates:
    """Each partition's training examples and `ratio` times as many held-out scenes with
    their class histogram."""
    workload = get_workload(cfg.workload)
    parts, member, owner = [], [], []
    start = HELD_OUT_START
    for pid in pids:
        train, _ = workload.load_data(cfg, pid, cfg.num_clients)
        counts = np.bincount(train.tensors["label"].numpy(), minlength=num_classes(cfg.data))
        held = held_out_indices(cfg.data.seed, cfg.data.max_objects,
                                np.round(counts * ratio).astype(int), start)
        start = int(held.max()) + 1 if held.size else start
        parts += [train, _scenes_like(cfg, train, held)]
        member += [np.ones(len(train), bool), np.zeros(len(held), bool)]
        owner += [np.full(len(train) + len(held), pid)]
    index = [getattr(p, "indices", None) for p in parts]
    return Candidates(_concat(parts), np.concatenate(member), np.concatenate(owner),
                      None if any(i is None for i in index) else np.concatenate(index))


def population(cfg: ExperimentConfig, like: Candidates, size: int) -> TensorDictDataset:
    counts = _population_counts(cfg, like, size)
    if cfg.data.name != "synthetic":
        return _held_out_population(cfg, like, counts, size)
    indices = held_out_indices(cfg.data.seed, cfg.data.max_objects, counts, POPULATION_START)
    return _scenes_like(cfg, like.data, indices)


def _population_counts(cfg: ExperimentConfig, like: Candidates, size: int) -> np.ndarray:
    counts = np.bincount(like.data.tensors["label"].numpy()[like.is_member],
                         minlength=num_classes(cfg.data))
    return np.round(counts / counts.sum() * size).astype(int)


# A real source: the recorded examples and the held-out tail.

def public_samples(cfg: ExperimentConfig) -> int:
    """The size of the workload's public split (models.seam.PublicSplit), else 0."""
    workload = get_workload(cfg.workload)
    return workload.public_samples(cfg) if isinstance(workload, PublicSplit) else 0


def checked_data_record(cfg: ExperimentConfig, run_dir: Path, pid: int,
                        state_dir: str | Path | None) -> dict[str, Any]:
    """Partition `pid`'s data-indices.json, checked against the source as it is now."""
    folder = client_state_folder(cfg, run_dir, pid, state_dir)
    record = read_data_record(folder)
    if record is None:
        raise AuditError(
            f"partition {pid}: no {DATA_INDICES_FILE} in {folder}; a data.name="
            f"{cfg.data.name} run is audited on the examples each client recorded there "
            "(its clients write it after training): rerun the run with this version, or "
            "restore the file")
    now = source_fingerprint(cfg.data)
    if record.get("source") != cfg.data.name or record.get("fingerprint") != now:
        raise AuditError(
            f"partition {pid}: {folder / DATA_INDICES_FILE} names the examples of "
            f"{record.get('fingerprint')!r} and data.name={cfg.data.name} is now {now!r}: "
            "the source's files changed since the run, so its indices no longer name the "
            "examples it trained on; restore the files the run used, or audit a run "
            "trained on these")
    return record


def _layout(cfg: ExperimentConfig, public: int) -> str:
    size = source_size(cfg.data)
    clients = min(cfg.data.num_samples, size)
    return (f"data.name={cfg.data.name} has {size} examples: {clients} for the clients "
            f"(data.num_samples={cfg.data.num_samples}), {public} for the public split, "
            f"{max(size - clients - public, 0)} held out")


def recorded_candidates(cfg: ExperimentConfig, run_dir: str | Path, pids: list[int],
                        ratio: float, state_dir: str | Path | None = None) -> Candidates:
    """A real source's candidates: each audited partition's recorded training examples,
    and `ratio` times as many held-out examples with their class histogram, its own
    recorded test examples first, then the source's held-out tail; `rest` is what is
    left of the tail. No example any client recorded, and none of the public split, is
    ever a non-member."""
    run_dir = Path(run_dir)
    records = {pid: checked_data_record(cfg, run_dir, pid, state_dir) for pid in pids}
    for pid in set(range(cfg.num_clients)) - set(pids):  # the others', where kept
        try:
            records[pid] = checked_data_record(cfg, run_dir, pid, state_dir)
        except RunFolderError:
            pass
    labels = get_source(cfg.data).labels
    k = num_classes(cfg.data)
    train = {pid: np.asarray(r["train"], dtype=np.int64) for pid, r in records.items()}
    test = {pid: np.asarray(r["test"], dtype=np.int64) for pid, r in records.items()}
    trained = np.concatenate(list(train.values()))
    used = np.concatenate([trained, *test.values()])
    public = public_samples(cfg)
    pool = held_out_pool(cfg.data, public)
    if np.isin(pool, used).any():
        raise AuditError(f"the clients' recorded examples overlap the held-out tail of "
                         f"{_layout(cfg, public)}: the run's data layout is not this "
                         "version's; audit a run trained with it")
    for pid in pids:
        if np.isin(test[pid], trained).any():
            raise AuditError(f"partition {pid}: its recorded test examples include examples "
                             "a client trained on; the record is not a run's, rerun the run")
    by_class = [pool[labels[pool] == c] for c in range(k)]

    # Non-members per partition and class: its own test examples, then the tail.
    want = {pid: np.round(np.bincount(labels[train[pid]], minlength=k) * ratio).astype(int)
            for pid in pids}
    own = {pid: [test[pid][labels[test[pid]] == c][: want[pid][c]] for c in range(k)]
           for pid in pids}
    short = np.sum([want[pid] - [len(o) for o in own[pid]] for pid in pids], axis=0)
    have = np.array([len(b) for b in by_class])
    if (short > have).any():
        c = int(np.argmax(short - have))
        members = sum(len(train[pid]) for pid in pids)
        best = _largest_ratio(own, train, labels, have, ratio, pids, k)
        lower = (f"lower --non-member-ratio to {best:.2f} or less, or " if best > 0 else "")
        raise AuditError(
            f"--non-member-ratio {ratio:g}: {members} members need "
            f"{sum(int(w.sum()) for w in want.values())} non-members with their class "
            f"histogram, and class {class_names(cfg.data)[c]!r} lacks "
            f"{int(short[c] - have[c])} (it needs {int(short[c])} beyond the clients' own "
            f"test examples; the held-out tail has {int(have[c])}). {_layout(cfg, public)}: "
            f"{lower}rerun with a lower data.num_samples (a longer held-out tail)")
    member, owner, index = [], [], []
    taken = np.zeros(k, dtype=int)
    for pid in pids:
        tail = [by_class[c][taken[c]: taken[c] + want[pid][c] - len(own[pid][c])]
                for c in range(k)]
        taken += [len(t) for t in tail]
        held = np.concatenate([*own[pid], *tail])
        index += [train[pid], held]
        member += [np.ones(len(train[pid]), bool), np.zeros(len(held), bool)]
        owner += [np.full(len(train[pid]) + len(held), pid)]
    caption_len = _caption_len(cfg, pids[0])
    data = examples(cfg.data, np.concatenate(index), caption_len)
    rest = np.concatenate([by_class[c][taken[c]:] for c in range(k)])
    return Candidates(data, np.concatenate(member), np.concatenate(owner),
                      np.concatenate(index), np.sort(rest))


def _largest_ratio(own, train, labels, have, ratio, pids, k) -> float:
    """The largest ratio (in hundredths) the held-out examples supply."""
    def fits(r: float) -> bool:
        short = np.zeros(k, dtype=int)
        for pid in pids:
            need = np.round(np.bincount(labels[train[pid]], minlength=k) * r).astype(int)
            short += np.maximum(need - [len(o) for o in own[pid]], 0)
        return bool((short <= have).all())

    low, high = 0, int(math.ceil(ratio * 100))  # fits(low / 100), not fits(high / 100)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid / 100) else (low, mid)
    return low / 100


def _caption_len(cfg: ExperimentConfig, pid: int) -> int:
    """The caption length of the workload's own datasets (12 where it has none)."""
    like, _ = get_workload(cfg.workload).load_data(cfg, pid, cfg.num_clients)
    return like.tensors["caption"].shape[1] if "caption" in like.tensors else 12


def _held_out_population(cfg: ExperimentConfig, like: Candidates, counts: np.ndarray,
                         size: int) -> TensorDictDataset:
    """`counts[c]` of the held-out examples left after the candidates, per class c."""
    labels = get_source(cfg.data).labels
    rest = like.rest
    by_class = [rest[labels[rest] == c] for c in range(len(counts))]
    have = np.array([len(b) for b in by_class])
    if (counts > have).any():
        c = int(np.argmax(counts - have))
        fits = [z for z in range(size, -1, -1)
                if (_population_counts(cfg, like, z) <= have).all()]
        name = class_names(cfg.data)[c]
        raise AuditError(
            f"--population {size}: RMIA's population needs {int(counts.sum())} held-out "
            f"examples with the members' class histogram, {int(counts[c])} of class "
            f"{name!r}, and after the {len(like.is_member)} candidates the held-out tail has "
            f"{len(rest)} ({int(have[c])} of class {name!r}). "
            f"{_layout(cfg, public_samples(cfg))}: lower --population to {fits[0]} or less, "
            "lower --non-member-ratio, or rerun with a lower data.num_samples")
    indices = np.concatenate([b[:n] for b, n in zip(by_class, counts)])
    caption_len = (like.data.tensors["caption"].shape[1] if "caption" in like.data.tensors
                   else 12)
    return examples(cfg.data, indices, caption_len)


def _subset(data: TensorDictDataset, index: np.ndarray) -> TensorDictDataset:
    return TensorDictDataset({k: v[torch.from_numpy(index)] for k, v in data.tensors.items()})


# --------------------------------------------------------------------------- the models

def reference_halves(n: int, k: int, seed: int) -> np.ndarray:
    """[K, N] membership of the reference models: pairs trained on complementary random
    halves, so every example is IN for exactly K/2 of them."""
    if k < 2 or k % 2:
        raise AuditError(f"--references {k}: give an even number >= 2 (pairs of reference "
                         "models train on complementary halves); 4 or more for per-example "
                         "LiRA variances and RMIA's fitted a")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(k // 2):
        inside = np.zeros(n, bool)
        inside[rng.permutation(n)[: n // 2]] = True
        rows += [inside, ~inside]
    return np.stack(rows)


def train_reference(cfg: ExperimentConfig, data: TensorDictDataset, epochs: int, seed: int,
                    device: torch.device):
    """One reference model: the workload's own local training, `epochs` epochs on `data`,
    through DP-SGD at the run's noise when the run used it."""
    workload = get_workload(cfg.workload)
    ref_cfg = dataclasses.replace(
        cfg, seed=cfg.seed, train=dataclasses.replace(cfg.train, local_epochs=epochs),
        strategy=dataclasses.replace(cfg.strategy, proximal_mu=0.0))
    model = workload.build(ref_cfg, device)
    make_private = None
    if cfg.privacy.dp.mode == "local":  # the same total steps as the run's clients
        dp = dataclasses.replace(cfg.privacy.dp, max_epsilon=None)
        make_private = ClientDP(dp, 1, epochs).make_private
    lora_train = "b" if cfg.strategy.name == "ffa_lora" else "ab"
    workload.train_local(model, data, ref_cfg, lora_train=lora_train, seed=seed,
                         make_private=make_private)
    return model


def _logits(cfg: ExperimentConfig, model, data) -> torch.Tensor:
    workload = get_workload(cfg.workload)
    assert isinstance(workload, ClassLogits)  # audit() refuses the others first
    return workload.class_logits(model, data, cfg)


# --------------------------------------------------------------------------- the audit

def parse_target(target: str, num_clients: int) -> list[int]:
    if target == "global":
        return list(range(num_clients))
    if target.startswith("client:") and target[7:].isdigit() and int(target[7:]) < num_clients:
        return [int(target[7:])]
    raise AuditError(f"--target {target!r}: use 'global' or 'client:<partition>' with a "
                     f"partition in 0..{num_clients - 1}")


def parse_attacks(text: str) -> list[str]:
    attacks = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in attacks if a not in mia.ATTACKS]
    if unknown or not attacks:
        raise AuditError(f"--attacks {text!r}: unknown {unknown or 'empty list'}; choose "
                         f"from {','.join(mia.ATTACKS)}")
    return attacks


def audit(run_dir: str | Path, target: str = "global", attacks: str = "loss,lira,rmia",
          references: int = 4, reference_epochs: int | None = None,
          non_member_ratio: float = 1.0, population_size: int = 500,
          fixed_variance: bool = False, rmia_a: float | None = None,
          fprs: tuple[float, ...] | None = None, device: str | None = None,
          seed: int = 0, state_dir: str | Path | None = None,
          console: Console | None = None) -> dict[str, Any]:
    """Run the audit; write audit.json and roc.png; return the JSON's content.

    `fprs` None reports TPR at 1 % and 0.1 % FPR where the non-members resolve them
    ("n/a" otherwise); FPRs asked for explicitly must be resolvable."""
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    cfg, _ = finished_run(run_dir)
    if cfg.split.mode != "off":
        raise AuditError(f"--run {run_dir}: a split run (split.mode={cfg.split.mode}) keeps "
                         "half the model on the server; the membership audit covers federated "
                         "runs (split training's label leakage: privacy.label_leakage.audit)")
    if not isinstance(get_workload(cfg.workload), ClassLogits):
        raise AuditError(f"--run {run_dir}: workload {cfg.workload!r} has no classification "
                         "head to score (models.seam.ClassLogits); the membership audit covers "
                         "mtsc and tosc runs")
    pids = parse_target(target, cfg.num_clients)
    names = parse_attacks(attacks)
    if not non_member_ratio > 0:
        raise AuditError(f"--non-member-ratio {non_member_ratio}: give a ratio > 0")
    needs_refs = any(a in ("lira", "rmia") for a in names)
    if needs_refs:
        reference_halves(2, references, 0)  # checks K before any work
    if "rmia" in names and rmia_a is None and references < 4:
        raise AuditError(f"--references {references}: fitting RMIA's offline a needs at least "
                         "4 reference models; give --references 4 or more, or --rmia-a")
    strict = fprs is not None
    fprs = tuple(fprs) if fprs is not None else DEFAULT_FPRS
    epochs = reference_epochs or cfg.rounds * cfg.train.local_epochs
    dev = resolve_device(device or cfg.device)

    try:
        if cfg.data.name == "synthetic":
            cands = candidates(cfg, pids, non_member_ratio)
        else:
            cands = recorded_candidates(cfg, run_dir, pids, non_member_ratio, state_dir)
    except DataError as err:  # the source cannot be read as the run read it
        raise AuditError(f"--run {run_dir}: {err}") from err
    negatives = int((~cands.is_member).sum())
    for fpr in fprs:
        if strict and negatives < math.ceil(10 / fpr):
            raise AuditError(f"--fpr {fpr:g} needs at least {math.ceil(10 / fpr)} non-members; "
                             f"this target has {negatives}: raise --non-member-ratio to "
                             f"{math.ceil(10 / fpr) / max(int(cands.is_member.sum()), 1):.1f} "
                             "or ask for a larger FPR")
    labels = cands.data.tensors["label"]
    pop = population(cfg, cands, population_size) if "rmia" in names else None

    # The target: each candidate through its own client's model.
    own = {key: np.zeros(len(labels)) for key in ("loss", "p", "phi")}  # target's signals
    pop_target_p = np.zeros((len(labels), len(pop))) if pop is not None else None
    correct = np.zeros(len(labels), bool)
    dp_eps = []
    for pid in pids:
        history = saved_client_state(cfg, run_dir, pid, state_dir).get(HISTORY_KEY)
        if history is not None and history.size:
            dp_eps.append(epsilon_of([tuple(h) for h in history], cfg.privacy.dp.delta))
        model = restore_client(cfg, run_dir, pid, dev, state_dir)
        mine = np.flatnonzero(cands.owner == pid)
        logits = _logits(cfg, model, _subset(cands.data, mine))
        for key, value in mia.signals(logits, labels[mine]).items():
            own[key][mine] = value
        correct[mine] = (logits.argmax(-1) == labels[mine]).numpy()
        if pop is not None:
            pop_target_p[mine] = mia.signals(_logits(cfg, model, pop),
                                             pop.tensors["label"])["p"][None, :]

    ref_in = ref_phi = ref_p = pop_ref_p = None
    if needs_refs:
        ref_in = reference_halves(len(labels), references, seed)
        ref_phi, ref_p = np.zeros(ref_in.shape), np.zeros(ref_in.shape)
        pop_ref_p = np.zeros((references, len(pop))) if pop is not None else None
        columns = [TextColumn("[bold]reference models"), BarColumn(),
                   TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn()]
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("train", total=references)
            for k in range(references):
                model = train_reference(cfg, _subset(cands.data, np.flatnonzero(ref_in[k])),
                                        epochs, seed * 1000 + k, dev)
                sig = mia.signals(_logits(cfg, model, cands.data), labels)
                ref_phi[k], ref_p[k] = sig["phi"], sig["p"]
                if pop is not None:
                    pop_ref_p[k] = mia.signals(_logits(cfg, model, pop), pop.tensors["label"])["p"]
                progress.advance(task)

    scores: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}
    if "loss" in names:
        scores["loss"] = mia.loss_scores(own["loss"])
    if "lira" in names:
        pooled = fixed_variance or references // 2 < mia.MIN_MODELS_PER_SIDE
        suffix = " (fixed variance)" if pooled else ""
        scores["lira-online" + suffix] = mia.lira_scores(own["phi"], ref_phi, ref_in, True, pooled)
        scores["lira-offline" + suffix] = mia.lira_scores(own["phi"], ref_phi, ref_in, False,
                                                          pooled)
        if pooled and not fixed_variance:
            notes["lira"] = f"{references} reference models: one variance pooled over examples"
    if "rmia" in names:
        scores["rmia-online"] = mia.rmia_scores(own["p"], ref_p, ref_in, pop_target_p, pop_ref_p)
        a = rmia_a if rmia_a is not None else mia.fit_rmia_a(ref_p, ref_in, pop_ref_p)
        notes["rmia"] = f"offline a = {a:g}" + (" (given)" if rmia_a is not None else
                                                " (fitted on reference model 0)")
        scores[f"rmia-offline (a={a:g})"] = mia.rmia_scores(own["p"], ref_p, ref_in,
                                                            pop_target_p, pop_ref_p, offline_a=a)

    delta = cfg.privacy.dp.delta
    results = {name: summarise(s, cands.is_member, fprs, delta) for name, s in scores.items()}
    out_dir = run_dir / f"audit-{target.replace(':', '-')}"
    out_dir.mkdir(exist_ok=True)
    report = {
        "run": run_dir.name, "target": target, "workload": cfg.workload,
        "members": int(cands.is_member.sum()), "non_members": negatives,
        "population": 0 if pop is None else len(pop),
        "reference_models": references if needs_refs else 0, "reference_epochs": epochs,
        "member_accuracy": float(correct[cands.is_member].mean()),
        "non_member_accuracy": float(correct[~cands.is_member].mean()),
        "data": cfg.data.name,
        "dp_mode": cfg.privacy.dp.mode,
        "dp_epsilon": max(dp_eps) if dp_eps else None, "delta": delta,
        "attacks": results, "notes": notes,
    }
    (out_dir / "audit.json").write_text(json.dumps(report, indent=2))
    plot_roc(scores, cands.is_member, out_dir / "roc.png",
             f"{run_dir.name}, target {target} "
             f"({report['members']} members, {negatives} non-members)")
    print_table(report, console)
    console.print(f"wrote {out_dir / 'audit.json'} and {out_dir / 'roc.png'}")
    return report


def summarise(scores: np.ndarray, is_member: np.ndarray, fprs, delta: float) -> dict[str, Any]:
    row: dict[str, Any] = {"auc": attack_auc(scores, is_member)}
    for fpr in fprs:
        try:
            row[f"tpr_at_fpr_{fpr:g}"] = tpr_at_fpr(scores, is_member, fpr)
        except TooFewNonMembers as err:
            row[f"tpr_at_fpr_{fpr:g}"] = "n/a"
            row[f"tpr_at_fpr_{fpr:g}_why"] = str(err)
    row["empirical_epsilon"] = empirical_epsilon(scores, is_member, delta=delta)
    return row


def plot_roc(scores: dict[str, np.ndarray], is_member: np.ndarray, path: Path, title: str):
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    floor = 1 / max(int((~is_member).sum()), 1)
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(is_member, s)
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor),
                label=f"{name}, AUC {attack_auc(s, is_member):.3f}")
    ax.plot([floor, 1], [floor, 1], "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"membership inference, target {report['target']}: "
                  f"{report['members']} members, {report['non_members']} non-members")
    first = next(iter(report["attacks"].values()))
    tpr_keys = [k for k in first if k.startswith("tpr_at_fpr_") and not k.endswith("_why")]
    for col in ["attack", "AUC", *[f"TPR@{k[11:]} FPR" for k in tpr_keys], "empirical eps"]:
        table.add_column(col)
    for name, row in report["attacks"].items():
        tprs = [row[k] if isinstance(row[k], str) else f"{row[k]:.4f}" for k in tpr_keys]
        table.add_row(name, f"{row['auc']:.3f}", *tprs, f"{row['empirical_epsilon']:.2f}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.membership", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the folder of a finished run")
    parser.add_argument("--target", default="global", help="global or client:<partition>")
    parser.add_argument("--attacks", default="loss,lira,rmia")
    parser.add_argument("--references", type=int, default=4,
                        help="reference models K (even; pairs train on complementary halves)")
    parser.add_argument("--reference-epochs", type=int, default=None,
                        help="epochs per reference model (default: rounds x local_epochs)")
    parser.add_argument("--non-member-ratio", type=float, default=1.0,
                        help="held-out examples per member (TPR at FPR f needs 10/f "
                             "non-members)")
    parser.add_argument("--population", type=int, default=500, help="RMIA's population size")
    parser.add_argument("--fixed-variance", action="store_true", help="LiRA with one variance")
    parser.add_argument("--rmia-a", type=float, default=None,
                        help="RMIA's offline a (default: fitted on a reference model)")
    parser.add_argument("--fpr", type=float, action="append", default=None,
                        help="report TPR at this FPR (repeatable; default 0.01 and 0.001 "
                             "where the non-members resolve them)")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda (default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state-dir", default=None,
                        help="where the clients kept their private state (their node config's "
                             "state-dir; default: the run's client-state folder)")
    args = parser.parse_args(argv)
    try:
        audit(args.run, args.target, args.attacks, args.references, args.reference_epochs,
              args.non_member_ratio, args.population, args.fixed_variance, args.rmia_a,
              tuple(args.fpr) if args.fpr else None, args.device, args.seed, args.state_dir)
    except RunFolderError as err:  # an AuditError too
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
