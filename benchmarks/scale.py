"""Scale: a round on Ray against the same local training in a sequential loop, and the
peak memory of large simulations summed over every process they start.

    python benchmarks/scale.py [--clients 20] [--memory-clients 100 1000]

Measured numbers, not a test: nothing here asserts a speed or a size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from common.config import load_config
from common.seeding import round_seed
from models import get_workload


def round_config(clients: int, out: Path):
    """One round of federated LoRA (the demo's model), every client trains once."""
    return load_config(ROOT / "configs/quickstart.yaml", [
        f"num_clients={clients}", f"min_train_clients={clients}", "rounds=1",
        "fraction_evaluate=0", f"data.num_samples={60 * clients}", "train.local_epochs=1",
        f"output_dir={out}", "device=cpu"])


def ray_vs_sequential(clients: int = 20) -> dict:
    """Wall seconds of one Ray round (python -m simulation's engine, as configured:
    one CPU per client actor) and of the same local training of every client in a
    loop in this process (build, load the partition, train_local: what each client's
    train message does), with torch's default threads."""
    from simulation.run import simulate

    with tempfile.TemporaryDirectory() as tmp:
        cfg = round_config(clients, Path(tmp))
        workload = get_workload(cfg.workload)
        t0 = time.perf_counter()
        for pid in range(clients):
            model = workload.build(cfg, "cpu")
            train_ds, _ = workload.load_data(cfg, pid, clients)
            workload.train_local(model, train_ds, cfg, seed=round_seed(cfg.seed, 1, pid))
        sequential = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = simulate(cfg, Path(tmp) / "ray")
        ray_wall = time.perf_counter() - t0
    return {"clients": clients, "sequential_s": sequential, "torch_threads": torch.get_num_threads(),
            "ray_round_s": res["rounds"][0]["seconds"], "ray_run_s": ray_wall,
            "actors_cpus_per_client": cfg.simulation.num_cpus_per_client,
            "speedup": sequential / res["rounds"][0]["seconds"]}


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


def simulation_memory(clients: int, timeout_s: float = 900, interval_s: float = 1.0) -> dict:
    """Peak memory of `python -m simulation` with `clients` virtual clients (the sim100
    experiment, one round, 10 clients sampled), summed over the driver, Ray's own
    processes and every client actor, sampled every `interval_s`."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "simulation", "--config", "configs/sim100.yaml",
               "rounds=1", f"num_clients={clients}", f"fraction_train={10 / clients}",
               f"fraction_evaluate={10 / clients}", "min_train_clients=10",
               f"data.num_samples={max(10000, 10 * clients)}", "train.local_epochs=1",
               f"output_dir={tmp}"]
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
    return {"clients": clients, "peak_rss_sum_bytes": peak_rss, "peak_pss_sum_bytes": peak_pss,
            "processes_at_peak": procs_at_peak, "wall_s": wall, "returncode": proc.returncode,
            "error": err[-2000:] if proc.returncode else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--memory-clients", type=int, nargs="*", default=[100, 1000])
    args = parser.parse_args()
    print(json.dumps(ray_vs_sequential(args.clients)))
    for n in args.memory_clients:
        print(json.dumps(simulation_memory(n)))


if __name__ == "__main__":
    main()
