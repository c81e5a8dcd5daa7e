"""Where a Ray round's time goes: cProfile inside every client actor, and the rounds'
wall seconds on the driver.

    python -m benchmarks.profile_round [--clients 20] [--rounds 3] [--out DIR]

Runs `--rounds` rounds of the quickstart model (every client trains every round, no
evaluation) on Flower's Ray simulation, with a ClientApp mod that profiles each message
inside its actor (one .prof file per actor process). Prints, per round, the driver's
seconds and, summed over every actor, the seconds each part of a client's train
message took: the experiment check, the model build, reading its state, loading the
partition, training, writing its state, building the reply; the rest of a round (actor
start-up and imports, the engine's dispatch, (de)serialising messages, idle actors)
is what the driver waited beyond the actors' busy time. JSON to --out/profile.json.
Measured numbers, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The parts of a train message, by the function that does each (file, function name).
PARTS = {
    "experiment check (trust.node_experiment)": ("fl_client/trust.py", "node_experiment"),
    "model build (workload.build)": ("client_app.py", "_setup:build"),
    "global arrays check (trust.global_arrays)": ("fl_client/trust.py", "global_arrays"),
    "read saved state (load_saved_state)": ("fl_client/node.py", "load_saved_state"),
    "load partition (workload.load_data)": ("models/mtsc/workload.py", "load_data"),
    "train (workload.train_local)": ("models/mtsc/train.py", "train_local"),
    "write state (_save_private)": ("fl_client/client_app.py", "_save_private"),
    "record data indices": ("fl_client/node.py", "record_data_indices"),
    "reply arrays (shared_state)": ("models/mtsc/workload.py", "shared_state"),
}


def profiling_mod(msg, context, call_next):
    """A Flower ClientApp mod: profile this message in this actor, add it to the actor's
    file (FEDSEMCOM_PROFILE_DIR/actor-<pid>.prof) and note its wall seconds."""
    import cProfile

    folder = Path(os.environ["FEDSEMCOM_PROFILE_DIR"])
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        return call_next(msg, context)
    finally:
        prof.disable()
        wall = time.perf_counter() - t0
        rnd = int(msg.content["config"]["server-round"]) if "config" in msg.content else 0
        stem = folder / f"actor-{os.getpid()}-round-{rnd}-{time.time_ns()}"
        prof.dump_stats(f"{stem}.prof")
        import torch

        Path(f"{stem}.json").write_text(json.dumps({
            "round": rnd, "wall_s": wall, "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}))


def _cumulative(stats: pstats.Stats, file_part: str, name: str) -> float:
    total = 0.0
    for (file, _, func), (_, _, _, cum, _) in stats.stats.items():
        if func == name and file.replace("\\", "/").endswith(file_part):
            total += cum
    return total


def breakdown(folder: Path) -> dict[int, dict]:
    """Per round: messages, actors, their summed wall seconds and seconds per part."""
    rounds: dict[int, dict] = {}
    for meta in sorted(folder.glob("actor-*.json")):
        info = json.loads(meta.read_text())
        stats = pstats.Stats(str(meta.with_suffix(".prof")))
        row = rounds.setdefault(info["round"], {"messages": 0, "actors": set(),
                                                "busy_s": 0.0, "parts": {},
                                                "torch_threads": info["torch_threads"]})
        row["messages"] += 1
        row["actors"].add(info["pid"])
        row["busy_s"] += info["wall_s"]
        for label, (file_part, func) in PARTS.items():
            if func == "_setup:build":  # build is called inside _setup
                value = _cumulative(stats, "models/mtsc/model.py", "build")
            else:
                value = _cumulative(stats, file_part, func)
            row["parts"][label] = row["parts"].get(label, 0.0) + value
    for row in rounds.values():
        row["actors"] = len(row["actors"])
    return rounds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_round",
                                description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks" / "profile")
    args = p.parse_args(argv)

    from common.config import load_config
    from fl_client.client_app import make_app
    from simulation.run import simulate

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prof_dir = args.out / "prof"
        prof_dir.mkdir(exist_ok=True)
        for old in prof_dir.glob("actor-*"):
            old.unlink()
        os.environ["FEDSEMCOM_PROFILE_DIR"] = str(prof_dir)  # Ray's actors inherit it
        n = args.clients
        cfg = load_config(ROOT / "configs/quickstart.yaml", [
            f"num_clients={n}", f"min_train_clients={n}", f"rounds={args.rounds}",
            "fraction_evaluate=0", f"data.num_samples={60 * n}", "train.local_epochs=1",
            f"output_dir={tmp}", "device=cpu", "channel.sweep_snr_db=[]"])
        t0 = time.perf_counter()
        res = simulate(cfg, Path(tmp) / "run", client_app=make_app(mods=[profiling_mod]))
        process_s = time.perf_counter() - t0
        rounds = breakdown(prof_dir)
    out = {"clients": n, "process_s": process_s, "rounds": []}
    print(f"{n} clients, {args.rounds} rounds, whole simulate(): {process_s:.1f} s")
    for row in res["rounds"]:
        r = rounds.get(row["round"], {"messages": 0, "actors": 0, "busy_s": 0.0, "parts": {}})
        actors = max(r["actors"], 1)
        waited = row["seconds"] - r["busy_s"] / actors
        entry = {"round": row["round"], "round_s": row["seconds"], **r,
                 "driver_beyond_busy_actors_s": waited}
        out["rounds"].append(entry)
        print(f"\nround {row['round']}: {row['seconds']:.2f} s on the driver; "
              f"{r['messages']} messages on {r['actors']} actors, busy {r['busy_s']:.2f} "
              f"actor-s ({r['busy_s'] / actors:.2f} s each, {r.get('torch_threads')} torch "
              f"threads); the driver waited "
              f"{waited:.2f} s beyond that")
        for label, value in sorted(r["parts"].items(), key=lambda kv: -kv[1]):
            print(f"  {label:45s} {value:7.2f} actor-s  ({value / max(r['busy_s'], 1e-9):5.1%})")
    (args.out / "profile.json").write_text(json.dumps(out, indent=2))
    print(f"\n{args.out / 'profile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
