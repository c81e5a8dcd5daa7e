"""What every report's command line takes: `--config` (a YAML experiment file),
`--out` (the report folder; a completed run already in it is reused) and `key=value`
overrides; the config, checked before any work starts; and, with MLflow in the
config's `tracking`, the finished report's files logged as artefacts."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.config import ConfigError, ExperimentConfig, load_config
from common.records import new_run_dir


def report_parser(name: str, doc: str, config: str | None) -> argparse.ArgumentParser:
    """The parser of `python -m reports.<name>`; `config` is the default experiment file
    (None: --config is required). A report adds its own options to it."""
    parser = argparse.ArgumentParser(prog=f"python -m reports.{name}",
                                     description=doc.split("\n\n")[0])
    parser.add_argument("--config", default=config, required=config is None)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the report folder (default: <output_dir>/{name}_report-"
                             "<timestamp>); a completed run already in it is reused")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. rounds=5")
    return parser


def report_config(args: argparse.Namespace,
                  check: Callable[[ExperimentConfig], None] | None = None) -> ExperimentConfig:
    """The experiment config of a report's arguments, with the report's own `check`
    (it raises ConfigError); a bad one ends the process with its message and exit 2."""
    try:
        cfg = load_config(args.config, args.overrides)
        if check is not None:
            check(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg


def report_folder(args: argparse.Namespace, cfg: ExperimentConfig, name: str) -> Path:
    """--out, or a new <output_dir>/<name>_report-<timestamp>; created."""
    out = Path(args.out) if args.out else new_run_dir(cfg.output_dir, f"{name}_report")
    out.mkdir(parents=True, exist_ok=True)
    return out


def track_report(cfg: ExperimentConfig, out: Path) -> None:
    """With "mlflow" in `cfg.tracking`, the report's files in `out` as the artefacts of an
    MLflow run (common/tracking.py `log_report`); nothing otherwise."""
    if "mlflow" in cfg.tracking:
        from common.tracking import log_report

        log_report(cfg.to_dict(), out)


def finish_report(cfg: ExperimentConfig, out: Path, report: dict[str, Any],
                  plot: Callable[[dict[str, Any], Path], None], table: str) -> None:
    """The end of a report: report.json and report.png in `out`, the Markdown table
    printed, and the folder logged to MLflow where the config tracks it."""
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "report.png")
    print(table)
    print(f"results in {out}")
    track_report(cfg, out)


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Milliseconds of one call of `fn`: the median of `repeats` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
