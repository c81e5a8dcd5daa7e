"""Seconds per message and per split step on Flower's deployment engine: the stock
SuperNodes (Flower's commands, as `python -m deploy.launch` starts them) against the
fast path (`python -m deploy.launch --fast`, deploy/fast_node.py).

    python benchmarks/message_latency/split_deploy.py [--supernodes 2] [--steps 3]
                                                      [--messages 8] [--out DIR]

Per setting, on a SuperLink and SuperNodes on loopback with TLS and SuperNode
authentication:
- a query message to every SuperNode and back (benchmarks/message_latency's app, its
  ClientApp importing the fedsemcom ClientApp): the deployment's first exchange, the
  median of a later run's exchanges after its first, and the CPU seconds one exchange costs summed over every process of the
  deployment (after a warm-up run, a run with `--messages` more exchanges than
  another, the difference divided by `--messages`: a measure that does not depend on what else the machine
  runs; wall seconds on a loaded machine do);
- a split run of the mtsc quickstart (`split.mode=sequential`, one round of `--steps`
  steps, 160 examples, batch 16): the round's `seconds_per_step` (two exchanges each,
  server compute included) and `seconds_per_message` (their mean, with the round's
  first message, which on a fresh process also imports the app and builds the model);
- and, as the floor, the same steps of end-to-end training in this one process
  (models.mtsc.split.end_to_end_steps, partition 0): what a step costs without messages.
Writes deploy_split.json and deploy_split.png to --out. Measured numbers, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from deploy.launch import Deployment  # noqa: E402

APP = Path(__file__).resolve().parent
TASK_LINE = re.compile(r"task \d+: pull ([\d.]+) s, ClientApp ([\d.]+) s, push ([\d.]+) s")
SETTINGS = {"stock": "Flower's SuperNode and SuperExec (launcher defaults)",
            "fast": "deploy.launch --fast (deploy/fast_node.py)"}


def split_overrides(steps: int) -> str:
    return (f"split.mode=sequential split.steps_per_round={steps} rounds=1 "
            "fraction_evaluate=0 min_train_clients=1 data.num_samples=160 "
            "train.batch_size=16 split.client_timeout_s=300")


def group_cpu_s(pgids: set[int]) -> float:
    """CPU seconds (user + system, with reaped children) of every process in the given
    process groups: the SuperLink's and each SuperNode's, with their app processes."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) in pgids:
            total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def query(dep: Deployment, out: Path, messages: int) -> list[float]:
    res = dep.flwr("run", str(APP), dep.connection, "--run-config",
                   f'messages={messages} poll="fast" workload=true out="{out}"',
                   "--stream", timeout=900)
    if not out.exists():
        raise RuntimeError(f"the query run failed:\n{res.stdout[-3000:]}{res.stderr[-2000:]}")
    return json.loads(out.read_text())["seconds_per_exchange"]


def measure_setting(name: str, workdir: Path, supernodes: int, steps: int,
                    messages: int) -> dict:
    row: dict = {"setting": name, "supernodes": supernodes, "steps": steps}
    t0 = time.perf_counter()
    with Deployment(workdir / name, supernodes, fast=name == "fast") as dep:
        row["startup_s"] = time.perf_counter() - t0
        # CPU per exchange, whatever else the machine runs: two runs of the query app
        # that differ only in their number of exchanges, every process counted.
        pgids = {p.pid for p in dep.procs.values()}  # each started in its own session
        warm = query(dep, workdir / f"{name}-query-warm-up.json", 2)  # first-time costs
        cpu0 = group_cpu_s(pgids)
        query(dep, workdir / f"{name}-query-short.json", 2)
        cpu1 = group_cpu_s(pgids)
        seconds = query(dep, workdir / f"{name}-query.json", messages + 2)
        cpu2 = group_cpu_s(pgids)
        row["query_cpu_s_per_message"] = ((cpu2 - cpu1) - (cpu1 - cpu0)) / messages
        row["query_first_s"] = warm[0]  # the deployment's very first message
        row["query_s_per_message"] = statistics.median(seconds[1:])
        logs = sorted(dep.logs.glob("superexec-*.log"))
        seen = {log: log.stat().st_size for log in logs}
        split = dep.submit(split_overrides(steps), workdir / f"{name}-runs", timeout=1800)
        if name == "fast":  # where a split message's time goes, from the executors' logs
            tasks = [tuple(map(float, m)) for log in logs for m in TASK_LINE.findall(
                log.read_text(errors="replace")[seen[log]:])]
            for k, part in enumerate(("runtime_pull", "client_app", "runtime_push")):
                row[f"split_task_{part}_s"] = statistics.median(t[k] for t in tasks)
        (r,) = split["rounds"]
        row["split_s_per_step"] = r["seconds_per_step"]
        row["split_s_per_message"] = r["seconds_per_message"]
        # Inside a step: two exchanges, no process start, the server half's compute.
        row["split_s_per_step_message"] = r["seconds_per_step"] / 2
    return row


def in_process_s_per_step(supernodes: int, steps: int) -> float:
    """Seconds per step of the same training in one process (no messages), with the
    torch threads one app of the deployment gets (deploy.launch.threads_per_app)."""
    import torch

    from common.config import load_config
    from deploy.launch import threads_per_app
    from models.mtsc.split import end_to_end_steps

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or threads_per_app(supernodes)))

    cfg = load_config(ROOT / "configs/quickstart.yaml", split_overrides(steps))
    end_to_end_steps(cfg, 0, supernodes, rnd=1, steps=1)  # warm-up
    return end_to_end_steps(cfg, 0, supernodes, rnd=1, steps=steps)[1]


def measure(supernodes: int = 2, steps: int = 3, messages: int = 8,
            settings: list[str] | tuple[str, ...] = tuple(SETTINGS), progress=None) -> list[dict]:
    """One row per setting (stock, fast), each with the in-process floor."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in settings:
            rows.append(measure_setting(name, Path(tmp), supernodes, steps, messages))
            if progress is not None:
                progress()
    floor = in_process_s_per_step(supernodes, steps)
    for row in rows:
        row["in_process_s_per_step"] = floor
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| SuperNodes | query message (first) | query message (median of the rest) | "
             "CPU s per query message | "
             "split message (round mean) | split step | split message inside a step | "
             "step in one process |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['query_first_s']:.2f} s | "
                     f"{r['query_s_per_message']:.2f} s | {r['query_cpu_s_per_message']:.2f} s | "
                     f"{r['split_s_per_message']:.2f} s | "
                     f"{r['split_s_per_step']:.2f} s | {r['split_s_per_step_message']:.2f} s | "
                     f"{r['in_process_s_per_step']:.2f} s |")
    by = {r["setting"]: r for r in rows}
    if {"stock", "fast"} <= set(by):
        lines.append("")
        stock, fast = by["stock"], by["fast"]
        query = stock["query_s_per_message"] / fast["query_s_per_message"]
        step = stock["split_s_per_step"] / fast["split_s_per_step"]
        lines.append(f"fast over stock: query message {query:.1f}x, split step {step:.1f}x")
        if "split_task_client_app_s" in fast:
            lines.append(f"a split message on the fast executor, median: Runtime API pull "
                         f"{fast['split_task_runtime_pull_s']:.3f} s, ClientApp "
                         f"{fast['split_task_client_app_s']:.3f} s, push "
                         f"{fast['split_task_runtime_push_s']:.3f} s")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from common.records import plt

    keys = [("query_s_per_message", "query message"),
            ("split_s_per_message", "split message\n(round mean)"),
            ("split_s_per_step", "split step")]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [k + i * width for k in range(len(keys))]
        bars = ax.bar(xs, [r[k] for k, _ in keys], width, label=SETTINGS[r["setting"]])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks([k + width * (len(rows) - 1) / 2 for k in range(len(keys))],
                  [label for _, label in keys])
    ax.set(yscale="log", ylabel="seconds", title=f"deployment engine, {rows[0]['supernodes']} "
           "SuperNodes, TLS + SuperNode auth")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from rich.progress import Progress

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--messages", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with Progress() as bar:
        task = bar.add_task(", then ".join(args.settings), total=len(args.settings))
        rows = measure(args.supernodes, args.steps, args.messages, args.settings,
                       progress=lambda: bar.advance(task))
    (args.out / "deploy_split.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out / "deploy_split.png")
    print(table(rows))


if __name__ == "__main__":
    main()
