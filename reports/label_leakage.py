"""Label leakage of split training against the defences and what they cost.

    python -m reports.label_leakage [--config configs/split_quickstart.yaml] [key=value ...]

Runs the split experiment once per setting on Flower's Ray simulation (a fresh
`python -m simulation` process each, with `privacy.label_leakage.audit=true`): no
defence, label DP by randomized response at a few epsilons, and Gaussian noise on the
returned gradient at a few standard deviations. Writes leakage_report.json,
leakage_report.png (leakage AUC per round, and accuracy against leakage) and prints a
Markdown table. A completed run already in the output folder is reused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from common.config import need
from common.records import plt
from reports.cli import report_config, report_folder, report_parser, track_report
from reports.runs import simulation_run

SETTINGS = {
    "no defence": [],
    "label DP, eps 4": ["privacy.split_defence.label_epsilon=4"],
    "label DP, eps 1": ["privacy.split_defence.label_epsilon=1"],
    "gradient noise, std 0.01": ["privacy.split_defence.gradient_noise_std=0.01"],
    "gradient noise, std 0.05": ["privacy.split_defence.gradient_noise_std=0.05"],
}


def summarise(name: str, result: dict[str, Any]) -> dict[str, Any]:
    rounds = result["rounds"]
    last = rounds[-1]
    return {
        "setting": name, "rounds": len(rounds),
        "accuracy": last.get("accuracy"), "majority_class_share": last.get("majority_class_share"),
        "vqa_accuracy": last.get("vqa_accuracy"), "psnr": last.get("psnr"),
        # The server sees every round: the leakage of the round that leaked most.
        "leak_cosine_auc_max": max(r["leak_cosine_auc"] for r in rounds),
        "leak_norm_auc_max": max(r["leak_norm_auc"] for r in rounds),
        "leak_cosine_auc_per_round": [r["leak_cosine_auc"] for r in rounds],
        "leak_norm_auc_per_round": [r["leak_norm_auc"] for r in rounds],
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| setting | accuracy (majority share) | VQA accuracy | PSNR (dB) | "
             "direction-attack AUC, worst round | norm-attack AUC, worst round |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['accuracy']:.3f} ({r['majority_class_share']:.3f}) | "
                     f"{r['vqa_accuracy']:.3f} | {r['psnr']:.1f} | {r['leak_cosine_auc_max']:.3f} | "
                     f"{r['leak_norm_auc_max']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        xs = range(1, r["rounds"] + 1)
        a.plot(xs, r["leak_cosine_auc_per_round"], "-o", markersize=4, label=r["setting"])
        b.scatter(r["leak_cosine_auc_max"], r["accuracy"], label=r["setting"])
    a.axhline(0.5, color="grey", ls="--", lw=1)
    a.set(title="direction attack: label leakage AUC", xlabel="round", ylabel="AUC (0.5: none)")
    b.axhline(rows[0]["majority_class_share"], color="grey", ls="--", lw=1,
              label="majority class share")
    b.set(title="accuracy against leakage", xlabel="direction-attack AUC, worst round",
          ylabel="classification accuracy, last round")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = report_parser("label_leakage", __doc__,
                         "configs/split_quickstart.yaml").parse_args(argv)
    cfg = report_config(args, lambda c: need(
        c.split.mode != "off", "split.mode", c.split.mode,
        "'sequential' or 'parallel' (label leakage is a split-training attack)"))
    out = report_folder(args, cfg, "label_leakage")
    rows = []
    for i, (name, extra) in enumerate(SETTINGS.items()):
        print(f"[{i + 1}/{len(SETTINGS)}] {name}", flush=True)
        rows.append(summarise(name, simulation_run(
            args.config, ["privacy.label_leakage.audit=true", *args.overrides, *extra],
            out / f"run-{i}")))
        (out / "leakage_report.json").write_text(json.dumps(rows, indent=2))  # kept as it grows
    plot(rows, out / "leakage_report.png")
    table = markdown_table(rows)
    (out / "leakage_report.md").write_text(table + "\n")
    print(table)
    track_report(cfg, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
