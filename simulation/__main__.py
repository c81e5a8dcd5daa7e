"""python -m simulation --config configs/NAME.yaml [key=value ...]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulation",
        description="Federated LoRA fine-tuning of a semantic-communication model on "
                    "Flower's Ray-backed simulation runtime.",
    )
    parser.add_argument("--config", default="configs/quickstart.yaml",
                        help="YAML experiment file (default: %(default)s)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where to write metrics.json and plots (default: "
                             "<output_dir>/<name>-<timestamp>)")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last checkpoint "
                             "(same config; `rounds` may be raised)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. rounds=5 data.alpha=0.1")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from simulation.run import simulate  # heavy imports only after the config is valid

    if args.resume is not None and args.run_dir is not None:
        print("error: give either --resume RUN_DIR or --run-dir, not both", file=sys.stderr)
        return 2
    if args.resume is not None and not (args.resume / "checkpoint.npz").is_file():
        print(f"error: --resume {args.resume}: no checkpoint.npz there; pass the folder of "
              "an earlier run (runs/<name>-<timestamp>)", file=sys.stderr)
        return 2
    try:
        results = simulate(cfg, args.resume or args.run_dir, resume=args.resume is not None)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    last = results["rounds"][-1]
    shown = {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}
    print(f"final round {last['round']}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
