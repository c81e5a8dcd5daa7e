"""Seconds per message on Flower's deployment engine, Flower's defaults against the
settings the launcher uses, and the launcher's fast path (deploy/fast_node.py). Starts a SuperLink and SuperNodes on loopback (TLS, auth),
submits the latency app once per setting and prints the median seconds per exchange
after the first (the fast path's first exchange also imports the app into its
long-lived ClientApp process; the stock path pays that on every exchange).

    python benchmarks/message_latency/run.py [--supernodes 2] [--messages 5]
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from deploy.launch import Deployment

APP = Path(__file__).resolve().parent
SETTINGS = {  # name: (SuperExec task poll interval s, server-side poll, isolation, fast)
    "flower defaults": (1.0, "flower", "subprocess", False),
    "tuned (launcher)": (0.1, "fast", "subprocess", False),
    "process isolation": (0.1, "fast", "process", False),
    "fast path (--fast)": (0.1, "fast", "process", True),  # deploy/fast_node.py
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--messages", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (task_poll, poll, isolation, fast) in SETTINGS.items():
            with Deployment(Path(tmp) / name.split()[0], args.supernodes,
                            task_poll_interval_s=task_poll, isolation=isolation,
                            fast=fast) as dep:
                for workload in (False, True):
                    out = Path(tmp) / f"{name.split()[0]}-{workload}.json"
                    run_config = (f'messages={args.messages} poll="{poll}" '
                                  f'workload={str(workload).lower()} out="{out}"')
                    res = dep.flwr("run", str(APP), dep.connection, "--run-config",
                                   run_config, "--stream", timeout=600)
                    if not out.exists():
                        print(res.stdout[-3000:], res.stderr[-3000:], file=sys.stderr)
                        return 1
                    r = json.loads(out.read_text())
                    after_first = r["seconds_per_exchange"][1:] or r["seconds_per_exchange"]
                    rows.append((name, workload, statistics.median(after_first),
                                 statistics.median(r["client_import_s"])))
    print(f"{'setting':<18} {'ClientApp':<20} {'s per exchange':>15} {'of which import':>16}")
    for name, workload, sec, imp in rows:
        kind = "fedsemcom imports" if workload else "empty"
        print(f"{name:<18} {kind:<20} {sec:>15.2f} {imp:>16.2f}")
    base = {w: s for n, w, s, _ in rows if n == "flower defaults"}
    for n, w, s, _ in rows:
        if n != "flower defaults":
            print(f"{n} vs flower defaults, {'fedsemcom imports' if w else 'empty ClientApp'}: "
                  f"{base[w] / s:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
