"""The tosc report: teacher vs. students, like the Lightweight TOSC paper's table.

    python -m reports.tosc --config configs/distill_quickstart.yaml [key=value ...]

1. trains the teacher if its checkpoint is missing;
2. runs the federated distillation twice on Flower's Ray simulation, the same seeds:
   the student with KD + IB, and the same student without KD (distill.kd_weight=0,
   distill.feature_weight=0; the IB term stays); each run ends with the clients'
   accuracy at every SNR of channel.sweep_snr_db (their own heads, their test splits);
3. evaluates the teacher at the same SNRs on the union of the clients' test splits;
4. measures parameters, size (MB, float32), CPU latency per batch (median of repeats,
   one thread, a fixed batch of 32 at 10 dB) and the pre-stored teacher outputs (stored
   bytes, the time to run the teacher once vs. every epoch);
5. writes report.json and report.png and prints a Markdown table.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import ExperimentConfig, need
from common.data import num_classes
from common.data.tensor_dataset import TensorDictDataset
from models.tosc import teacher as tosc_teacher
from models.tosc import workload as tosc
from reports.cli import (
    median_ms,
    report_config,
    report_folder,
    report_parser,
    track_report,
)
from reports.runs import simulation_run

LATENCY_BATCH, LATENCY_SNR_DB = 32, 10.0




def _size(model: torch.nn.Module) -> dict[str, float]:
    """Parameters (training-only feature projection excluded) and float32 megabytes of
    everything a deployed model holds (parameters and buffers)."""
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("feature_proj"))
    buffers = sum(b.numel() for b in model.buffers())
    return {"parameters": params, "size_mb": (params + buffers) * 4 / 1e6}


def _at_snr(cfg: ExperimentConfig, snr_db: float) -> ExperimentConfig:
    channel = dataclasses.replace(cfg.channel, snr_db=snr_db, snr_range_db=None)
    return dataclasses.replace(cfg, channel=channel)


def _union(parts: list[TensorDictDataset]) -> TensorDictDataset:
    keys = ("image", "label")
    return TensorDictDataset({k: torch.cat([p.tensors[k] for p in parts]) for k in keys})


def prestored_costs(cfg: ExperimentConfig, trains: list[TensorDictDataset]) -> dict[str, Any]:
    """What pre-storing saves: the teacher run once per client instead of once per local
    epoch of every round, against reading the stored file back each round."""
    teacher = tosc_teacher.load_teacher(cfg)
    run_teacher = sum(median_ms(lambda d=d: tosc_teacher.compute_teacher_outputs(teacher, d, cfg),
                                repeats=3) for d in trains) / 1e3
    read_back = sum(median_ms(lambda d=d: tosc_teacher.prestored_teacher_outputs(cfg, d),
                              repeats=5) for d in trains) / 1e3
    stored = sum(tosc_teacher.prestored_teacher_outputs(cfg, d)[0].nbytes for d in trains)
    n = sum(len(d) for d in trains)
    passes = cfg.rounds * cfg.train.local_epochs
    online, prestored = passes * run_teacher, run_teacher + cfg.rounds * read_back
    # A student epoch over the same data, for scale (KD + IB, stored outputs).
    student = tosc.build(cfg)
    one_epoch = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, local_epochs=1))
    start = time.perf_counter()
    for d in trains:
        tosc.train_local(student, d, one_epoch)
    student_epoch = time.perf_counter() - start
    return {
        "examples": n,
        "stored_bytes": stored, "stored_bytes_per_example": stored / n,
        "float32_logits_bytes": n * num_classes(cfg.data) * 4,
        "teacher_pass_seconds": run_teacher, "read_back_seconds": read_back,
        "student_epoch_seconds": student_epoch,
        "teacher_passes_if_online": passes,
        "teacher_seconds_online": online, "teacher_seconds_prestored": prestored,
        "seconds_saved": online - prestored,
    }


def build_report(cfg: ExperimentConfig, kd: dict, no_kd: dict) -> dict[str, Any]:
    teacher = tosc_teacher.load_teacher(cfg)
    student = tosc.build(cfg)
    parts = [tosc.load_data(cfg, pid, cfg.num_clients) for pid in range(cfg.num_clients)]
    test = _union([p[1] for p in parts])
    teacher_acc = {snr: tosc.evaluate(teacher, test, _at_snr(cfg, snr))["accuracy"]
                   for snr in cfg.channel.sweep_snr_db}
    torch.set_num_threads(1)
    batch = test.tensors["image"][:LATENCY_BATCH]
    snr = torch.full((len(batch),), LATENCY_SNR_DB)
    latency = {}
    for name, model in (("teacher", teacher), ("student", student.eval())):
        with torch.no_grad():
            latency[name] = median_ms(lambda m=model: m(batch, snr), repeats=50, warmup=3)

    def sweep(run):
        return {row["snr_db"]: row["accuracy"] for row in run.get("snr_sweep", [])}

    majority = kd["snr_sweep"][0]["majority_class_share"] if kd.get("snr_sweep") else None
    rows = {
        "teacher": {**_size(teacher), "latency_ms": latency["teacher"], "accuracy": teacher_acc},
        "student_kd_ib": {**_size(student), "latency_ms": latency["student"],
                          "accuracy": sweep(kd)},
        "student_no_kd": {**_size(student), "latency_ms": latency["student"],
                          "accuracy": sweep(no_kd)},
    }
    return {
        "config": cfg.to_dict(), "models": rows, "majority_class_share": majority,
        "final_round": {"kd_ib": kd["rounds"][-1], "no_kd": no_kd["rounds"][-1]},
        "prestored": prestored_costs(cfg, [p[0] for p in parts]),
        "latency": {"batch": LATENCY_BATCH, "snr_db": LATENCY_SNR_DB, "threads": 1,
                    "repeats": 50, "statistic": "median"},
    }


def markdown_table(report: dict[str, Any]) -> str:
    snrs = sorted({s for m in report["models"].values() for s in m["accuracy"]})
    head = ("| model | parameters | size (MB) | CPU latency / batch of 32 (ms) | "
            + " | ".join(f"acc. {s:g} dB" for s in snrs) + " |")
    lines = [head, "|" + "---|" * (4 + len(snrs))]
    names = {"teacher": "teacher (ResNet-18 TOSC)", "student_kd_ib": "student, KD + IB",
             "student_no_kd": "student, no KD (IB only)"}
    for key, m in report["models"].items():
        accs = " | ".join(f"{m['accuracy'][s]:.3f}" if s in m["accuracy"] else "-" for s in snrs)
        lines.append(f"| {names[key]} | {m['parameters']:,} | {m['size_mb']:.3f} | "
                     f"{m['latency_ms']:.2f} | {accs} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("teacher", "teacher"), ("student_kd_ib", "student KD+IB"),
                       ("student_no_kd", "student no KD")):
        acc = report["models"][key]["accuracy"]
        snrs = sorted(acc)
        ax.plot(snrs, [acc[s] for s in snrs], marker="o", label=label)
    if report["majority_class_share"] is not None:
        ax.axhline(report["majority_class_share"], color="grey", ls="--",
                   label="majority class share")
    ax.set_xlabel("SNR (dB)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs. SNR (clients' test splits)")
    ax.legend()
    models = report["models"]
    names = ["teacher", "student"]
    size = [models["teacher"]["size_mb"], models["student_kd_ib"]["size_mb"]]
    lat = [models["teacher"]["latency_ms"], models["student_kd_ib"]["latency_ms"]]
    x = np.arange(2)
    bx.bar(x - 0.2, size, 0.4, label="size (MB)")
    bx.bar(x + 0.2, lat, 0.4, label="latency / batch (ms)")
    bx.set_xticks(x, names)
    bx.set_yscale("log")
    bx.set_title("size and CPU latency")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = report_parser("tosc", __doc__, "configs/distill_quickstart.yaml").parse_args(argv)

    def check(cfg: ExperimentConfig) -> None:
        need(cfg.workload == "tosc", "workload", cfg.workload, "'tosc' for this report")
        need(bool(cfg.channel.sweep_snr_db), "channel.sweep_snr_db", cfg.channel.sweep_snr_db,
             "a non-empty list of SNRs (dB) to compare the models at")

    cfg = report_config(args, check)
    out = report_folder(args, cfg, "tosc")
    tosc_teacher.ensure_teacher(cfg)
    kd = simulation_run(args.config, args.overrides, out / "kd_ib")
    no_kd = simulation_run(args.config, [*args.overrides, "distill.kd_weight=0",
                                        "distill.feature_weight=0"], out / "no_kd")
    report = build_report(cfg, kd, no_kd)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    plot(report, out / "report.png")
    p = report["prestored"]
    print(markdown_table(report))
    print(f"\npre-stored teacher outputs: {p['stored_bytes']:,} bytes for {p['examples']} "
          f"examples ({p['stored_bytes_per_example']:.0f} B each; float32 logits: "
          f"{p['float32_logits_bytes']:,} B); teacher run once {p['teacher_pass_seconds']:.2f} s "
          f"vs. every epoch {p['teacher_seconds_online']:.1f} s -> "
          f"{p['seconds_saved']:.1f} s saved over the run (a student epoch over all clients: "
          f"{p['student_epoch_seconds']:.2f} s)")
    print(f"results in {out}")
    track_report(cfg, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
