"""Scale: Ray rounds against the same local training in a sequential loop, each in a
fresh process as a user runs them, and large simulations: seconds per round and peak
memory summed over every process they start.

    python benchmarks/scale.py [--clients 20] [--rounds 5] [--memory-clients 100 1000]
    python benchmarks/scale.py --loop --clients 20 --rounds 5   (the loop alone)

Measured numbers, not a test: nothing here asserts a speed or a size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROUND_LINE = re.compile(r"round (\d+)/\d+.*?([\d.]+) s\s*$")


def round_overrides(clients: int, rounds: int, out: Path) -> list[str]:
    """The demo's model and data, `clients` clients that all train every round (one
    local epoch on 60 examples each), no evaluation and no final SNR sweep: the work
    the loop does too."""
    return [f"num_clients={clients}", f"min_train_clients={clients}", f"rounds={rounds}",
            "fraction_evaluate=0", f"data.num_samples={60 * clients}", "train.local_epochs=1",
            "channel.sweep_snr_db=[]", f"output_dir={out}", "device=cpu"]


def loop(clients: int, rounds: int) -> list[float]:
    """What a user writes without Flower: every round, every client builds its model,
    loads its partition and trains (torch's default threads, one process). Prints
    `round k/R` as each round ends; returns each round's seconds."""
    import torch  # noqa: F401  (imported before the first round starts, as Ray's side)

    from common.config import load_config
    from common.seeding import round_seed
    from models import get_workload

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs/quickstart.yaml",
                          round_overrides(clients, rounds, Path(tmp)))
        workload = get_workload(cfg.workload)
        seconds = []
        for rnd in range(1, rounds + 1):
            t0 = time.perf_counter()
            for pid in range(clients):
                model = workload.build(cfg, "cpu")
                train_ds, _ = workload.load_data(cfg, pid, clients)
                workload.train_local(model, train_ds, cfg, seed=round_seed(cfg.seed, rnd, pid))
            seconds.append(time.perf_counter() - t0)
            print(f"round {rnd}/{rounds}  {seconds[-1]:.3f} s", flush=True)
    return seconds


def _timed(cmd: list[str], timeout_s: float) -> dict:
    """Run `cmd` (a fresh Python process) and note, from its start, when each `round k/R
    ... X s` line appeared on its output (and the X it printed) and when it exited."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ends: dict[int, float] = {}
    printed: dict[int, float] = {}
    tail: list[str] = []
    watchdog = threading.Timer(timeout_s, proc.kill)  # also when it hangs silently
    watchdog.start()
    try:
        for line in proc.stdout:
            match = ROUND_LINE.search(line)
            if match:
                ends.setdefault(int(match.group(1)), time.perf_counter() - t0)
                printed.setdefault(int(match.group(1)), float(match.group(2)))
            tail = (tail + [line])[-30:]
        proc.wait()
    finally:
        watchdog.cancel()
    return {"round_end_from_start_s": [ends[k] for k in sorted(ends)],
            "round_s": [printed[k] for k in sorted(printed)],
            "process_s": time.perf_counter() - t0, "returncode": proc.returncode,
            "error": "".join(tail)[-2000:] if proc.returncode else ""}


def ray_vs_sequential(clients: int = 20, rounds: int = 5, timeout_s: float = 900) -> dict:
    """`python -m simulation` (Flower's Ray engine as configured: one CPU and one torch
    thread per client actor, so 2 actors on 2 cores) against `loop` in its own process,
    with the same clients, rounds and training. Per round: the server's own round time
    (Ray: from sending the round's messages to the last reply, actor start-up included
    in round 1) and the loop's; from each process's start to the end of its round 1;
    and the whole process."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "ray"
        ray = _timed([sys.executable, "-m", "simulation", "--config", "configs/quickstart.yaml",
                      "--run-dir", str(run_dir), *round_overrides(clients, rounds, Path(tmp))],
                     timeout_s)
        metrics = run_dir / "metrics.json"
        ray["round_s"] = ([r["seconds"] for r in json.loads(metrics.read_text())["rounds"]]
                          if metrics.is_file() else [])
        seq = _timed([sys.executable, "-m", "benchmarks.scale", "--loop", "--clients",
                      str(clients), "--rounds", str(rounds)], timeout_s)
    out = {"clients": clients, "rounds": rounds, "ray": ray, "loop": seq,
           "loop_torch_threads": torch.get_num_threads(), "actor_torch_threads": 1}
    if len(ray["round_s"]) == len(seq["round_s"]) == rounds:
        r, q = ray, seq
        out.update(
            round1_ratio=r["round_s"][0] / q["round_s"][0],
            round1_from_start_ratio=(r["round_end_from_start_s"][0]
                                     / q["round_end_from_start_s"][0]),
            later_rounds_ratio=sum(r["round_s"][1:]) / sum(q["round_s"][1:]),
            process_ratio=r["process_s"] / q["process_s"])
    return out


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _session(pid: int) -> int | None:
    """The session id of `pid` (field 6 of /proc/PID/stat), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[3])


def session_pids(leader: int) -> list[int]:
    """Every process of the session `leader` started (start_new_session=True): the
    driver, and Ray's GCS, raylet and client workers, which it starts below itself."""
    return [pid for pid in _pids() if _session(pid) == leader]


def _memory(pids: list[int]) -> tuple[int, int, int]:
    """(sum of RSS, sum of PSS, processes read) over `pids`, from psutil if installed,
    else /proc/PID/smaps_rollup. RSS counts shared pages (torch's libraries) once per
    process; PSS splits them among the processes, so its sum is their share of memory."""
    try:
        import psutil
    except ImportError:
        psutil = None
    rss = pss = n = 0
    for pid in pids:
        try:
            if psutil is not None:
                info = psutil.Process(pid).memory_full_info()
                r, q = info.rss, getattr(info, "pss", info.rss)
            else:
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024
                          for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
                          if line.split()[-1] == "kB"}
                r, q = fields["Rss"], fields["Pss"]
        except Exception:  # the process ended between listing and reading
            continue
        rss, pss, n = rss + r, pss + q, n + 1
    return rss, pss, n


def simulation_memory(clients: int, rounds: int = 3, timeout_s: float = 900,
                      interval_s: float = 1.0) -> dict:
    """Seconds per round and peak memory of `python -m simulation` with `clients` virtual
    clients (the sim100 experiment, 10 clients sampled per round, about 100 examples per
    client whatever the federation's size), the memory summed over the driver, Ray's
    own processes and every client actor, sampled every `interval_s`. Round 1 includes
    the actors' start-up; `later_round_s` is the mean of the others."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "simulation", "--config", "configs/sim100.yaml",
               "--run-dir", str(run_dir), f"rounds={rounds}", f"num_clients={clients}",
               f"fraction_train={10 / clients}", f"fraction_evaluate={10 / clients}",
               "min_train_clients=10", f"data.num_samples={100 * clients}",
               "train.local_epochs=1", "channel.sweep_snr_db=[]", f"output_dir={tmp}"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        peak_rss = peak_pss = procs_at_peak = 0
        try:
            while proc.poll() is None and time.perf_counter() - t0 < timeout_s:
                rss, pss, n = _memory(session_pids(proc.pid))
                if pss > peak_pss:
                    peak_pss, procs_at_peak = pss, n
                peak_rss = max(peak_rss, rss)
                time.sleep(interval_s)
        finally:
            if proc.poll() is None:
                proc.terminate()
            err = proc.communicate(timeout=60)[1]
        wall = time.perf_counter() - t0
        metrics = run_dir / "metrics.json"
        round_s = ([r["seconds"] for r in json.loads(metrics.read_text())["rounds"]]
                   if metrics.is_file() else [])
    return {"clients": clients, "peak_rss_sum_bytes": peak_rss, "peak_pss_sum_bytes": peak_pss,
            "processes_at_peak": procs_at_peak, "wall_s": wall, "returncode": proc.returncode,
            "round_s": round_s,
            "later_round_s": (sum(round_s[1:]) / len(round_s[1:])) if len(round_s) > 1 else None,
            "error": err[-2000:] if proc.returncode else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-clients", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--loop", action="store_true",
                        help="run only the sequential loop, in this process")
    args = parser.parse_args()
    if args.loop:
        loop(args.clients, args.rounds)
        return
    print(json.dumps(ray_vs_sequential(args.clients, args.rounds)))
    for n in args.memory_clients:
        print(json.dumps(simulation_memory(n)))


if __name__ == "__main__":
    main()
