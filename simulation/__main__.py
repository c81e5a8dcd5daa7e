"""python -m simulation --config configs/NAME.yaml [key=value ...]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simulation.config import ConfigError, load_config


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
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. rounds=5 data.alpha=0.1")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from simulation.run import simulate  # heavy imports only after the config is valid

    results = simulate(cfg, args.run_dir)
    last = results["rounds"][-1]
    shown = {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}
    print(f"final round {last['round']}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
