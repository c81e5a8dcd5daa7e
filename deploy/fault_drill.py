"""Fault drill on Flower's deployment engine: kill a SuperNode mid-run, restart it.

    python -m deploy.fault_drill [--rounds 4] [--timeout 60]

Starts a SuperLink and 3 SuperNodes (TLS, SuperNode auth), submits a run with
min_train_clients=2, kills SuperNode 2 (SIGKILL) once round 1 is written, restarts it
once round 2 is written, and prints each round's clients and the server's log lines
about the missing node. Takes a few minutes on 2 CPU cores, so it is a script and not
part of the test suite (tests/test_faults.py covers the same server logic in process).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from deploy.launch import Deployment


def rounds_written(out_dir: Path) -> int:
    files = list(out_dir.glob("*/metrics.json"))
    if not files:
        return 0
    try:
        return len(json.loads(files[0].read_text())["rounds"])
    except (json.JSONDecodeError, KeyError):
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.fault_drill")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=60.0, help="round_timeout_s")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out_dir = tmp / "runs"
        result: dict = {}
        with Deployment(tmp / "deploy", num_supernodes=3, state_dir=str(tmp / "state")) as dep:
            overrides = (f"rounds={args.rounds} min_train_clients=2 fraction_evaluate=0 "
                         f"round_timeout_s={args.timeout} data.num_samples=240 "
                         "train.batch_size=16")
            t0 = time.time()
            runner = threading.Thread(
                target=lambda: result.update(dep.submit(overrides, out_dir, timeout=1800)))
            runner.start()
            while rounds_written(out_dir) < 1 and runner.is_alive():
                time.sleep(0.5)
            dep.kill_supernode(2)
            print(f"{time.time() - t0:6.1f} s  killed SuperNode 2 after round 1", flush=True)
            while rounds_written(out_dir) < 2 and runner.is_alive():
                time.sleep(0.5)
            dep.start_supernode(2)
            dep.wait_for_supernodes([2])
            print(f"{time.time() - t0:6.1f} s  restarted SuperNode 2 after round 2", flush=True)
            runner.join()
            print(f"{time.time() - t0:6.1f} s  run {result.get('status')}")
            server_log = "\n".join(
                line for line in dep.last_run_log.splitlines()
                if "no reply from node" in line or "Dropping the reply" in line
                or "min_train_clients" in line)
        for r in result.get("rounds", []):
            print(f"round {r['round']}: replied {r['clients_replied']}, accepted "
                  f"{r.get('clients_accepted', 0)}, missing {r['clients_missing']}, "
                  f"{r['seconds']:.1f} s")
        print(server_log or "(no server log lines about missing nodes: see the run's stream)")
    return 0 if result.get("status") == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
