"""One privacy report: utility, epsilon and measured leakage for each DP setting.

    python -m reports.privacy [--config configs/distill_quickstart.yaml] [--references 4]
        [--leakage runs/leakage_report-<stamp>] [--out DIR] [key=value ...]

Runs the experiment once per setting on Flower's Ray simulation (a fresh
`python -m simulation` process each; a completed run in the output folder is reused):
no DP, DP-SGD on every client at epsilon 8 and 1, central DP with server-side
clipping, and a pair that memorises (3 rounds of 20 local epochs) without and with
DP-SGD at epsilon 1. Each finished run is audited for membership inference (reports/membership.py,
target `global`: every client's deployed model, members against as many held-out scenes).
Label leakage is a split-training attack: `--leakage` adds the rows of a
`python -m reports.label_leakage` folder. Writes privacy_report.json, privacy_report.md
(the table) and privacy_report.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from common.records import plt
from reports.cli import report_config, report_folder, report_parser, track_report
from reports.membership import AuditError, audit
from reports.runs import simulation_run

OVERFIT = ["rounds=3", "train.local_epochs=20"]
# Setting -> (overrides, membership target). The last two memorise (60 local epochs);
# they are audited on one client, which keeps DP-SGD's reference models affordable.
SETTINGS = {
    "no DP": ([], "global"),
    "DP-SGD, epsilon 8": (["privacy.dp.mode=local", "privacy.dp.epsilon=8"], "global"),
    "DP-SGD, epsilon 1": (["privacy.dp.mode=local", "privacy.dp.epsilon=1"], "global"),
    "central DP, noise 1.0, server clipping": ([
        "privacy.dp.mode=central", "privacy.dp.noise_multiplier=1.0",
        "privacy.dp.clipping=server"], "global"),
    "no DP, 3 rounds x 20 epochs": (OVERFIT, "client:0"),
    "DP-SGD, epsilon 1, 3 rounds x 20 epochs": (
        [*OVERFIT, "privacy.dp.mode=local", "privacy.dp.epsilon=1"], "client:0"),
}


def _epsilon(last: dict[str, Any]) -> float | None:
    return last.get("dp_epsilon_max") or last.get("dp_central_epsilon")


def summarise(name: str, result: dict[str, Any], mia: dict[str, Any]) -> dict[str, Any]:
    last = result["rounds"][-1]
    attacks = mia["attacks"]
    tprs = [a["tpr_at_fpr_0.01"] for a in attacks.values()
            if not isinstance(a["tpr_at_fpr_0.01"], str)]
    return {
        "setting": name, "rounds": len(result["rounds"]), "mia_target": mia["target"],
        "accuracy": last.get("accuracy"), "majority_class_share": last.get("majority_class_share"),
        "epsilon": _epsilon(last), "epsilon_kind": "client" if last.get("dp_epsilon_max") else
        ("round" if last.get("dp_central_epsilon") else None),
        "mia_members": mia["members"], "mia_non_members": mia["non_members"],
        "mia_auc_best": max(a["auc"] for a in attacks.values()),
        "mia_best_attack": max(attacks, key=lambda k: attacks[k]["auc"]),
        "mia_tpr_at_1pct_best": max(tprs) if tprs else "n/a",
        "mia_empirical_epsilon": max(a["empirical_epsilon"] for a in attacks.values()),
        "mia_auc": {k: a["auc"] for k, a in attacks.items()},
        "member_accuracy": mia["member_accuracy"],
        "non_member_accuracy": mia["non_member_accuracy"],
        "label_leakage_auc": None,
    }


def leakage_rows(folder: Path) -> list[dict[str, Any]]:
    """The split-training rows of a leakage report (no membership audit there)."""
    path = folder / "leakage_report.json"
    if not path.is_file():
        raise AuditError(f"--leakage {folder}: no leakage_report.json there; run "
                         "python -m reports.label_leakage first and pass its folder")
    return [{"setting": f"split training, {r['setting']}", "rounds": r["rounds"],
             "accuracy": r["accuracy"], "majority_class_share": r["majority_class_share"],
             "epsilon": None, "epsilon_kind": None, "mia_auc_best": None,
             "mia_tpr_at_1pct_best": None, "mia_empirical_epsilon": None,
             "label_leakage_auc": r["leak_cosine_auc_max"]}
            for r in json.loads(path.read_text())]


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else fmt.format(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| setting | accuracy (majority share) | epsilon | MIA target (members) | "
             "MIA AUC, best attack | MIA TPR at 1% FPR, best | empirical epsilon (95%) | "
             "label-leakage AUC |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = _cell(r["epsilon"], "{:.2f}")
        if r["epsilon_kind"] == "round":
            eps += " (central)"
        best = "-" if r["mia_auc_best"] is None else \
            f"{r['mia_auc_best']:.3f} ({r['mia_best_attack']})"
        target = "-" if r.get("mia_target") is None else \
            f"{r['mia_target']} ({r['mia_members']})"
        lines.append(
            f"| {r['setting']} | {r['accuracy']:.3f} ({r['majority_class_share']:.3f}) | {eps} | "
            f"{target} | {best} | {_cell(r['mia_tpr_at_1pct_best'], '{:.4f}')} | "
            f"{_cell(r['mia_empirical_epsilon'], '{:.2f}')} | "
            f"{_cell(r['label_leakage_auc'], '{:.3f}')} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    audited = [r for r in rows if r["mia_auc_best"] is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["setting"] for r in audited]
    attacks = sorted({k for r in audited for k in r["mia_auc"]})
    width = 0.8 / max(len(attacks), 1)
    for j, attack in enumerate(attacks):
        a.bar([i + j * width for i in range(len(audited))],
              [r["mia_auc"].get(attack, 0) for r in audited], width, label=attack)
    a.axhline(0.5, color="grey", ls="--", lw=1)
    a.set_xticks([i + 0.4 - width / 2 for i in range(len(audited))], names, rotation=15,
                 fontsize=7)
    a.set(title="membership inference AUC per attack", ylabel="AUC (0.5: none)",
          ylim=(0.4, max(0.8, max((max(r["mia_auc"].values()) for r in audited), default=0.8))))
    a.legend(fontsize=7)
    for r in audited:
        b.scatter(r["mia_auc_best"], r["accuracy"], label=r["setting"])
    b.axhline(audited[0]["majority_class_share"] if audited else 0, color="grey", ls="--",
              lw=1, label="majority class share")
    b.set(title="accuracy against membership leakage", xlabel="best attack's AUC",
          ylabel="accuracy, last round")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _audit(run: Path, target: str, references: int) -> dict[str, Any]:
    """The membership audit of `run`, reused when one with as many references exists."""
    done = run / f"audit-{target.replace(':', '-')}" / "audit.json"
    if done.is_file() and json.loads(done.read_text())["reference_models"] == references:
        print(f"reusing the audit in {done.parent}", flush=True)
        return json.loads(done.read_text())
    return audit(run, target, references=references)


def main(argv: list[str] | None = None) -> int:
    parser = report_parser("privacy", __doc__, "configs/distill_quickstart.yaml")
    parser.add_argument("--references", type=int, default=4)
    parser.add_argument("--leakage", type=Path, default=None,
                        help="a python -m reports.label_leakage folder to add its rows")
    args = parser.parse_args(argv)
    cfg = report_config(args)
    try:
        extra_rows = leakage_rows(args.leakage) if args.leakage else []
    except AuditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = report_folder(args, cfg, "privacy")
    rows = []
    for i, (name, (extra, target)) in enumerate(SETTINGS.items()):
        print(f"[{i + 1}/{len(SETTINGS)}] {name}", flush=True)
        result = simulation_run(args.config, [*args.overrides, *extra], out / f"run-{i}")
        report = _audit(out / f"run-{i}", target, args.references)
        rows.append(summarise(name, result, report))
        (out / "privacy_report.json").write_text(json.dumps(rows, indent=2))  # kept as it grows
    rows += extra_rows
    (out / "privacy_report.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "privacy_report.png")
    table = markdown_table(rows)
    (out / "privacy_report.md").write_text(table + "\n")
    print(table)
    track_report(cfg, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
