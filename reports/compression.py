"""Transmitters sized to each client's budget (LAM-MTSC's adaptive model compression,
models/mtsc/compression.py, docs/compression.md), measured against the budgets.

    python -m reports.compression [--config configs/mtsc_compression.yaml] [--out DIR]
        [--examples N] [key=value ...]

1. trains three federations on Flower's Ray simulation (svd_lora), a completed run in
   --out reused: `mixed`, the config's `model.client_budgets` (one client per budget,
   round-robin over partitions); `full`, every client at full size; `full_seed1`, the
   same at seed + 1 (one seed's noise);
2. restores every client of `mixed` as it ended the run (reports/runs.py) and measures,
   one row per budget: the plan it got, its classification and VQA accuracy on its test
   split with the transmitter it deploys (int8 where the plan says so), the adapter
   bytes it sends up per round, the channel symbols it sends per example, its
   transmitter's weight bytes, its fp32 FLOPs as a share of the full transmitter's, and
   its forward latency in ms per example on one thread (median of repeats), each beside
   the budget;
3. compares the full-size client (partition 0) after `mixed` with the same client after
   `full` and `full_seed1`: compressed peers must not cost it more than one seed's noise;
4. writes report.json and report.png and prints a Markdown table.

The data are the synthetic scenes and the LAM a small BART with random weights: the
numbers are this workload's, not the paper's.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torch.utils.data import DataLoader

from common.config import ExperimentConfig, load_config, need
from models.client_state import client_budget, client_experiment
from models.mtsc import workload as mtsc
from models.mtsc.compression import deployed_transmitter, forward_flops, weight_bytes
from models.mtsc.config import parse_budget
from reports.cli import (
    finish_report,
    median_ms,
    report_config,
    report_folder,
    report_parser,
)
from reports.runs import restore_client, simulation_run

LATENCY_BATCH, LATENCY_REPEATS = 32, 15
RUNS = ("mixed", "full", "full_seed1")


def _overrides(args, name: str) -> list[str]:
    """The command line's overrides plus the run's own: no budgets for the full-size
    federations, and the next seed for one of them."""
    extra = {"mixed": [], "full": ["model.client_budgets=[]"],
             "full_seed1": ["model.client_budgets=[]", f"seed={args.seed + 1}"]}[name]
    return [*args.overrides, *extra]


def _test_split(cfg: ExperimentConfig, pid: int, examples: int | None):
    _, test = mtsc.load_data(cfg, pid, cfg.num_clients)
    if examples is not None:
        test = torch.utils.data.Subset(test, range(min(examples, len(test))))
    return test




@torch.no_grad()
def client_row(cfg: ExperimentConfig, run_dir: Path, pid: int, examples: int | None,
               full_bytes: int, full_flops: float) -> dict[str, Any]:
    """One client of a finished run, measured against its budget."""
    budget = client_budget(cfg, pid)
    own = client_experiment(cfg, pid)
    model = restore_client(cfg, run_dir, pid)  # the client's model, its budget applied
    plan = model.compression
    test = _test_split(own, pid, examples)
    metrics = mtsc.evaluate(model, test, own)
    deployed = deployed_transmitter(model.transmitter, plan is not None and plan.int8)
    batch = next(iter(DataLoader(test, batch_size=LATENCY_BATCH)))
    question = batch["question"] if "vqa" in own.model.tasks else None
    snr = torch.full((len(batch["image"]),), 10.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms = median_ms(lambda: deployed(batch["image"], question, snr), LATENCY_REPEATS)
    finally:
        torch.set_num_threads(threads)
    sent = model.transmitter(batch["image"], question, snr).symbols_sent.mean().item()
    shared = mtsc.shared_state(model)
    nbytes = weight_bytes(deployed)
    flops = forward_flops(model.transmitter, own)
    row = {
        "partition": pid, "budget": budget,
        "plan": None if plan is None else {
            "layers": plan.layers, "lora_rank": plan.lora_rank,
            "jscc_symbols": plan.jscc_symbols, "int8": plan.int8},
        "accuracy": metrics["accuracy"], "vqa_accuracy": metrics["vqa_accuracy"],
        "psnr": metrics["psnr"],
        "bytes_up_per_round": int(sum(a.nbytes for a in shared.values())),
        "channel_symbols_per_example_10db": sent,
        "transmitter_bytes": nbytes, "memory_share": nbytes / full_bytes,
        "compute_share": flops / full_flops,
        "latency_ms_per_example": ms / len(batch["image"]),
    }
    if budget is not None:
        b = parse_budget(budget)
        row["fits"] = (nbytes <= b.amount if b.kind == "memory"
                       else flops <= b.amount * full_flops * (1 + 1e-9))
    return row


def full_reference(cfg: ExperimentConfig) -> tuple[int, float]:
    """(weight bytes, FLOPs) of the full-size transmitter of `cfg`."""
    plain = copy.deepcopy(cfg)
    plain.sections["model"] = dataclasses.replace(cfg.model, client_budgets=[],
                                                  transmitter_budget=None)
    tx = mtsc.build(plain, "cpu").transmitter
    return weight_bytes(deployed_transmitter(tx, False)), forward_flops(tx, plain)


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| budget | layers | rank | symbols/token | int8 | accuracy | VQA acc. | "
             "bytes up/round | tx memory (B) | memory share | compute share | "
             "latency (ms/ex.) | fits |", "|" + "---|" * 13]
    for r in report["rows"]:
        p = r["plan"] or {}
        lines.append(
            f"| {r['budget']} | {p.get('layers', '-')} | {p.get('lora_rank', '-')} | "
            f"{p.get('jscc_symbols', '-')} | {'yes' if p.get('int8') else 'no'} | "
            f"{r['accuracy']:.3f} | {r['vqa_accuracy']:.3f} | {r['bytes_up_per_round']} | "
            f"{r['transmitter_bytes']} | {r['memory_share']:.2f} | {r['compute_share']:.2f} | "
            f"{r['latency_ms_per_example']:.3f} | {r.get('fits', '-')} |")
    c = report["full_client"]
    lines += ["", f"Full-size client (partition 0) accuracy: with compressed peers "
              f"{c['mixed']:.3f}, with full-size peers {c['full']:.3f} (seed + 1: "
              f"{c['full_seed1']:.3f}; one seed's noise {c['seed_noise']:.3f}); "
              f"within the noise: {c['within_noise']}"]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [str(r["budget"]) for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [("accuracy", "accuracy (classification)", None),
              ("bytes_up_per_round", "adapter bytes up per round", None),
              ("memory_share", "transmitter memory (share of full)", "memory"),
              ("compute_share", "compute (share of full FLOPs)", "compute")]
    for ax, (key, title, kind) in zip(axes, panels):
        ax.bar(labels, [r[key] for r in rows], color="tab:blue")
        if kind is not None:
            for i, r in enumerate(rows):
                b = parse_budget(r["budget"]) if r["budget"] is not None else None
                if b is not None and b.kind == kind:
                    limit = (b.amount / report["full_bytes"] if kind == "memory" else b.amount)
                    ax.plot([i - 0.4, i + 0.4], [limit, limit], color="tab:red")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("budget")
    c = report["full_client"]
    axes[0].axhline(c["full"], color="grey", ls="--", lw=1, label="full client, full peers")
    axes[0].legend(fontsize=7)
    axes[2].plot([], [], color="tab:red", label="budget")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = report_parser("compression", __doc__, "configs/mtsc_compression.yaml")
    parser.add_argument("--examples", type=int, default=None,
                        help="test examples per client to score (default: all)")
    args = parser.parse_args(argv)

    def check(cfg: ExperimentConfig) -> None:
        need(cfg.workload == "mtsc", "workload", cfg.workload, "'mtsc' for this report")
        need(bool(cfg.model.client_budgets), "model.client_budgets", cfg.model.client_budgets,
             "a non-empty list of budgets for this report")
        need(args.examples is None or args.examples >= 1, "--examples", args.examples, ">= 1")

    cfg = report_config(args, check)
    args.seed = cfg.seed
    out = report_folder(args, cfg, "compression")
    for name in RUNS:
        simulation_run(args.config, _overrides(args, name), out / name)
    full_bytes, full_flops = full_reference(cfg)
    report: dict[str, Any] = {"config": cfg.to_dict(), "full_bytes": full_bytes,
                              "full_flops": full_flops, "rows": []}
    with Progress() as progress:
        bar = progress.add_task("measuring", total=len(cfg.model.client_budgets) + 2)
        for pid in range(len(cfg.model.client_budgets)):
            report["rows"].append(client_row(cfg, out / "mixed", pid, args.examples,
                                             full_bytes, full_flops))
            progress.advance(bar)
        accuracy = {}
        for name in ("full", "full_seed1"):
            run_cfg = load_config(args.config, _overrides(args, name))
            model = restore_client(run_cfg, out / name, 0)
            accuracy[name] = mtsc.evaluate(model, _test_split(run_cfg, 0, args.examples),
                                           run_cfg)["accuracy"]
            progress.advance(bar)
    mixed = report["rows"][0]["accuracy"]
    noise = abs(accuracy["full"] - accuracy["full_seed1"])
    report["full_client"] = {"mixed": mixed, **accuracy, "seed_noise": noise,
                             "within_noise": mixed >= accuracy["full"] - noise}
    report["overrides"] = {name: _overrides(args, name) for name in RUNS}
    finish_report(cfg, out, report, plot, markdown_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
