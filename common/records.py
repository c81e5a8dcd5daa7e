"""Run results: `runs/<run-id>/metrics.json`, rewritten after every round (so a run that
fails half-way keeps what it measured), and `metrics.png` beside it; with the config's
`tracking`, each round and both files also go to TensorBoard / MLflow (common/tracking.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

from common.tracking import Tracker


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only; no display on servers and CI),
    imported on first use: client processes never plot, and the import costs them
    about 0.4 s of start-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def __getattr__(name: str):
    if name == "plt":  # `from common.records import plt`, for the reports' figures
        return _pyplot()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Panel(NamedTuple):
    """One plot of metrics.png: the metrics drawn per round under one title."""

    title: str
    keys: tuple[str, ...]
    reference: tuple[str, ...] = ()  # drawn dashed: a baseline to read the others against


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(output_dir) / f"{name}-{stamp}"
    i = 1
    while run_dir.exists():
        run_dir = Path(output_dir) / f"{name}-{stamp}-{i}"
        i += 1
    run_dir.mkdir(parents=True)
    return run_dir


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # never leaves a half-written file behind


class RunRecorder:
    """Collects one row per round and keeps the JSON and the plot up to date."""

    def __init__(self, run_dir: Path, config: dict[str, Any],
                 rounds: list[dict[str, Any]] | None = None, panels: tuple[Panel, ...] = ()):
        """`rounds`: the rows already measured (a resumed run continues them);
        `panels`: what metrics.png shows."""
        self.run_dir = Path(run_dir)
        self.panels = panels
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"config": config, "rounds": list(rounds or []),
                                     "status": "running"}
        self.tracker = Tracker(config, self.run_dir)

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.data["rounds"]

    def add_round(self, row: dict[str, Any]) -> None:
        self.rounds.append(row)
        self._save()
        self.tracker.log_round(row["round"], row)

    def finish(self, status: str = "completed", **extra: Any) -> None:
        self.data["status"] = status
        self.data.update(extra)
        self._save()
        for name in ("metrics.json", "metrics.png"):
            self.tracker.log_artifact(self.run_dir / name)
        self.tracker.close("FINISHED" if status == "completed" else "FAILED")

    def _save(self) -> None:
        _write_atomic(self.run_dir / "metrics.json", json.dumps(self.data, indent=2))
        plot_rounds(self.rounds, self.run_dir / "metrics.png", self.panels,
                    self.data["config"].get("name", ""))


def plot_rounds(rounds: list[dict[str, Any]], path: Path, panels: tuple[Panel, ...],
                title: str = "") -> None:
    panels = [p for p in panels if any(p.keys[0] in r for r in rounds)]
    if not panels:
        return
    cols = 3
    rows_n = (len(panels) + cols - 1) // cols
    plt = _pyplot()
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        for k in panel.keys + panel.reference:
            pts = [(r["round"], r[k]) for r in rounds if r.get(k) is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = "--" if k in panel.reference else "-o"
            ax.plot(xs, ys, style, label=k.replace("_", " "), markersize=4)
        ax.set_title(panel.title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if len(panel.keys + panel.reference) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
