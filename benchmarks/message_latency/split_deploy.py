"""Seconds per message and per split step on Flower's deployment engine: the stock
SuperNodes (Flower's commands, as `python -m deploy.launch` starts them) against the
fast path (`python -m deploy.launch --fast`, deploy/fast_node.py).

    python benchmarks/message_latency/split_deploy.py [--supernodes 2] [--steps 3]
                                                      [--messages 8] [--out DIR]

Per setting, on a SuperLink and SuperNodes on loopback with TLS and SuperNode
authentication:
- a query message to every SuperNode and back (benchmarks/message_latency's app, its
  ClientApp importing the fedsemcom ClientApp): the first exchange, and the median of
  the others;
- a split run of the mtsc quickstart (`split.mode=sequential`, one round of `--steps`
  steps, 160 examples, batch 16): the round's `seconds_per_step` (two exchanges each,
  server compute included) and `seconds_per_message` (their mean, with the round's
  first message, which on a fresh process also imports the app and builds the model).
Writes deploy_split.json and deploy_split.png to --out. Measured numbers, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from deploy.launch import Deployment  # noqa: E402

APP = Path(__file__).resolve().parent
SETTINGS = {"stock": "Flower's SuperNode and SuperExec (launcher defaults)",
            "fast": "deploy.launch --fast (deploy/fast_node.py)"}


def split_overrides(steps: int) -> str:
    return (f"split.mode=sequential split.steps_per_round={steps} rounds=1 "
            "fraction_evaluate=0 min_train_clients=1 data.num_samples=160 "
            "train.batch_size=16 split.client_timeout_s=300")


def measure_setting(name: str, workdir: Path, supernodes: int, steps: int,
                    messages: int) -> dict:
    row: dict = {"setting": name, "supernodes": supernodes, "steps": steps}
    t0 = time.perf_counter()
    with Deployment(workdir / name, supernodes, fast=name == "fast") as dep:
        row["startup_s"] = time.perf_counter() - t0
        out = workdir / f"{name}-query.json"
        res = dep.flwr("run", str(APP), dep.connection, "--run-config",
                       f'messages={messages} poll="fast" workload=true out="{out}"',
                       "--stream", timeout=900)
        if not out.exists():
            raise RuntimeError(f"the query run failed:\n{res.stdout[-3000:]}{res.stderr[-2000:]}")
        seconds = json.loads(out.read_text())["seconds_per_exchange"]
        row["query_first_s"] = seconds[0]
        row["query_s_per_message"] = statistics.median(seconds[1:])
        split = dep.submit(split_overrides(steps), workdir / f"{name}-runs", timeout=1800)
        (r,) = split["rounds"]
        row["split_s_per_step"] = r["seconds_per_step"]
        row["split_s_per_message"] = r["seconds_per_message"]
        # Inside a step: two exchanges, no process start, the server half's compute.
        row["split_s_per_step_message"] = r["seconds_per_step"] / 2
    return row


def measure(supernodes: int = 2, steps: int = 3, messages: int = 8,
            progress=None) -> list[dict]:
    """One row per setting (stock, fast)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in SETTINGS:
            rows.append(measure_setting(name, Path(tmp), supernodes, steps, messages))
            if progress is not None:
                progress()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| SuperNodes | query message (first) | query message (median of the rest) | "
             "split message (round mean) | split step | split message inside a step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['query_first_s']:.2f} s | "
                     f"{r['query_s_per_message']:.2f} s | {r['split_s_per_message']:.2f} s | "
                     f"{r['split_s_per_step']:.2f} s | {r['split_s_per_step_message']:.2f} s |")
    by = {r["setting"]: r for r in rows}
    if {"stock", "fast"} <= set(by):
        lines.append("")
        lines.append(f"fast over stock: query message {by['stock']['query_s_per_message'] / by['fast']['query_s_per_message']:.1f}x, "
                     f"split step {by['stock']['split_s_per_step'] / by['fast']['split_s_per_step']:.1f}x")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from common.records import plt

    keys = [("query_s_per_message", "query message"), ("split_s_per_message", "split message\n(round mean)"),
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
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with Progress() as bar:
        task = bar.add_task("stock, then fast SuperNodes", total=len(SETTINGS))
        rows = measure(args.supernodes, args.steps, args.messages,
                       progress=lambda: bar.advance(task))
    (args.out / "deploy_split.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out / "deploy_split.png")
    print(table(rows))


if __name__ == "__main__":
    main()
