"""Split training over Flower messages against the same steps in one process.

    python benchmarks/split_step.py [--batches 16 64 256] [--steps 16] [--out DIR]

For each batch size: seconds per step of end-to-end training in one process (the median
of three runs: before, between and after the split runs), and of the U-shaped split over Flower's simulation runtime (Ray backend,
one client, `split.poll_interval_s` 0.01) with Flower's own 0.1 s dispatch tick
(`simulation.dispatch_interval_s: null`) and with the default 5 ms tick; their
throughput ratio (split samples/s over in-process samples/s); and the bytes a step puts
on the wire for each compression. Writes split_step.json and split_step.png to --out.
Measured numbers, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flwr.app import ArrayRecord

from common.config import load_config
from common.records import plt
from fl_client.split_handlers import activation_record
from fl_server.split_loop import ServerHalf
from models.mtsc import workload as mtsc
from models.mtsc.split import end_to_end_steps
from models.split_wire import CODECS, encode, record_bytes, step_generator
from simulation.run import simulate


def bench_config(batch: int, steps: int, out: Path, *extra: str):
    return load_config(ROOT / "configs/split_quickstart.yaml", [
        "num_clients=1", "min_train_clients=1", "rounds=1", "fraction_evaluate=0",
        f"data.num_samples={max(160, int(batch * 1.3) + 8)}", f"train.batch_size={batch}",
        "split.mode=sequential", f"split.steps_per_round={steps}", f"output_dir={out}",
        "device=cpu", *extra,
    ])


def bytes_per_step(cfg, codec: str) -> tuple[int, int]:
    """Uplink and downlink bytes of one step, through the same encoders the split uses."""
    from torch.utils.data import default_collate

    cfg = load_config(ROOT / "configs/split_quickstart.yaml", [
        f"train.batch_size={cfg.train.batch_size}", f"data.num_samples={cfg.data.num_samples}",
        "num_clients=1", "min_train_clients=1", f"split.compression={codec}"])
    model = mtsc.build(cfg)
    train_ds, _ = mtsc.load_data(cfg, 0, 1)
    batch = default_collate([train_ds[i] for i in range(cfg.train.batch_size)])
    tx, received, snr_db = model.uplink(batch, generator=step_generator(0))
    acts = activation_record(tx.counts, received, snr_db, codec)
    server = ServerHalf(model.receiver, cfg, mtsc)
    out = server.forward(acts, step_generator(1))
    grad_out = ArrayRecord(encode("output", torch.randn(server._graph[2].shape), codec))
    grads = server.backward(grad_out)
    return record_bytes(acts) + record_bytes(grad_out), record_bytes(out) + record_bytes(grads)


# name: (label, config overrides) of the simulation settings compared
SETTINGS = {
    "flower_tick": ("split, Flower's 0.1 s dispatch tick", ["simulation.dispatch_interval_s=null"]),
    "fast_dispatch": ("split, 5 ms dispatch tick", []),
}


def measure(batches: list[int], steps: int, progress=None) -> list[dict]:
    """One row per batch size: seconds per step in process and split, throughput
    ratios, bytes per step by codec."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            cfg = bench_config(batch, steps, Path(tmp))

            def in_process() -> float:
                torch.set_num_threads(1)  # like each Ray client actor (num_cpus_per_client=1)
                try:
                    return end_to_end_steps(cfg, 0, 1, rnd=1, steps=steps)[1]
                finally:
                    torch.set_num_threads(threads)

            # In process before, between and after the split runs: on a shared machine
            # the load changes, and the median sees about what the split runs saw.
            end_to_end_steps(cfg, 0, 1, rnd=1, steps=2)  # warm-up (allocations, lazy init)
            local_runs = [in_process()]
            sims = {}
            for name, (_, extra) in SETTINGS.items():
                res = simulate(bench_config(batch, steps, Path(tmp), *extra),
                               Path(tmp) / f"b{batch}-{name}")
                sims[name] = res["rounds"][0]["seconds_per_step"]
                local_runs.append(in_process())
            local = sorted(local_runs)[len(local_runs) // 2]
            row = {"batch": batch, "steps": steps, "in_process_s_per_step": local,
                   "in_process_runs_s_per_step": local_runs}
            for name, sim in sims.items():
                row[f"simulation_{name}_s_per_step"] = sim
                row[f"throughput_ratio_{name}"] = local / sim
            for codec in CODECS:
                up, down = bytes_per_step(cfg, codec)
                row[f"bytes_up_{codec}"], row[f"bytes_down_{codec}"] = up, down
            rows.append(row)
            if progress is not None:
                progress()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = measure(args.batches, args.steps)
    (args.out / "split_step.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out / "split_step.png")
    print(table(rows))


def table(rows) -> str:
    lines = ["| batch | in-process ms/step | split ms/step (Flower's 0.1 s tick) | split ms/step "
             "(5 ms tick) | throughput split/in-process | bytes/step fp32 | float16 | "
             "bfloat16 | int8 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = {c: r[f"bytes_up_{c}"] + r[f"bytes_down_{c}"] for c in CODECS}
        lines.append(
            f"| {r['batch']} | {1e3 * r['in_process_s_per_step']:.0f} | "
            f"{1e3 * r['simulation_flower_tick_s_per_step']:.0f} | "
            f"{1e3 * r['simulation_fast_dispatch_s_per_step']:.0f} | "
            f"{r['throughput_ratio_flower_tick']:.2f} -> "
            f"{r['throughput_ratio_fast_dispatch']:.2f} | "
            + " | ".join(f"{b[c] / 1024:.0f} KiB" for c in CODECS) + " |")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    batches = [r["batch"] for r in rows]
    a.plot(batches, [r["batch"] / r["in_process_s_per_step"] for r in rows], "o-",
           label="in process")
    for name, (label, _) in SETTINGS.items():
        a.plot(batches, [r["batch"] / r[f"simulation_{name}_s_per_step"] for r in rows], "o-",
               label=label)
    a.set(xscale="log", xlabel="batch", ylabel="samples / s", title="training throughput")
    a.set_xticks(batches, [str(b) for b in batches])
    a.minorticks_off()
    a.legend()
    for c in CODECS:
        b.plot(batches, [(r[f"bytes_up_{c}"] + r[f"bytes_down_{c}"]) / 1024 for r in rows],
               "o-", label=c)
    b.set(xscale="log", yscale="log", xlabel="batch", ylabel="KiB per step (up + down)",
          title="wire bytes per split step")
    b.set_xticks(batches, [str(x) for x in batches])
    b.xaxis.set_minor_locator(plt.NullLocator())
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
