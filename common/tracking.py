"""Run tracking: a run's config, per-round metrics and result files also logged to
TensorBoard and/or MLflow, as the config's `tracking` list names them (empty: off).

TensorBoard writes event files to `<run_dir>/tensorboard/`: the config as text, every
numeric metric of a round's row and of each client's reply with the round as step, and
at the end the config as hyperparameters with the last round's metrics. MLflow logs one MLflow run per
run, in the experiment named after the config's `name`, to `tracking_uri`, by default
`sqlite:///<output_dir>/mlflow.db` (one store for every run of that output folder, its
artefacts in `<output_dir>/mlartifacts/`): the config as params (dotted keys), the same
metrics by round (each client's as `clients/<node id>/<train|evaluate>/<metric>`), result files as artefacts, and FINISHED or FAILED at the end. Both
packages load only when a tracker opens, so a config check never imports them.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

# MLflow's limits (mlflow.utils.validation): longer params are cut, batches split.
PARAM_KEY_MAX, PARAM_VALUE_MAX, PARAMS_PER_BATCH, METRICS_PER_BATCH = 250, 6000, 100, 1000


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys with string values (a list stays one value)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = str(value)
    return out


def numeric(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a round's row, the round itself left out."""
    return {k: float(v) for k, v in row.items() if k != "round" and not isinstance(v, bool)
            and isinstance(v, (int, float)) and math.isfinite(v)}


class Tracker:
    """The trackers a config names, opened for one run; each call does nothing for a
    tracker that is off."""

    def __init__(self, config: dict[str, Any], run_dir: Path):
        names = config.get("tracking") or ()
        self.writer = None  # TensorBoard's SummaryWriter
        self.client, self.run_id = None, None  # MLflow's
        params = flatten(config) if names else {}
        self.params, self.last_row = params, None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))
        if "mlflow" in names:
            self._start_mlflow(config, Path(run_dir).name, params)

    def _start_mlflow(self, config: dict[str, Any], run_name: str,
                      params: dict[str, str]) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves the machine
        os.environ.setdefault("DO_NOT_TRACK", "1")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        output_dir = Path(config.get("output_dir") or "runs").resolve()
        uri = config.get("tracking_uri") or f"sqlite:///{output_dir / 'mlflow.db'}"
        artifacts = None  # a server's own artefact store
        if uri.startswith("sqlite:///"):  # beside the store (MLflow's default is the cwd)
            artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        output_dir.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        name = config.get("name") or "experiment"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
            except MlflowException:  # another run created it just now
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        items = [Param(k[:PARAM_KEY_MAX], v[:PARAM_VALUE_MAX]) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + PARAMS_PER_BATCH])

    def log_round(self, rnd: int, row: dict[str, Any]) -> None:
        """Every numeric metric of the round's row, at step `rnd`."""
        self._log(rnd, numeric(row))
        self.last_row = row

    @property
    def active(self) -> bool:
        """Whether any tracker is on (callers skip gathering what only trackers read)."""
        return self.writer is not None or self.client is not None

    def log_clients(self, rnd: int, kind: str, clients: dict[str, dict[str, Any]]) -> None:
        """Each client's own metrics of round `rnd` (`kind`: train or evaluate), as
        `clients/<node id>/<kind>/<metric>`: what the server received before aggregating."""
        self._log(rnd, {f"clients/{cid}/{kind}/{k}": v for cid, metrics in clients.items()
                        for k, v in numeric(metrics).items()})

    def _log(self, rnd: int, values: dict[str, float]) -> None:
        if not values:
            return
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, global_step=rnd)
            self.writer.flush()
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(_mlflow_key(k), v, now, rnd) for k, v in values.items()]
            for i in range(0, len(items), METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=items[i:i + METRICS_PER_BATCH])

    def log_artifact(self, path: str | Path) -> None:
        if self.client is not None and Path(path).is_file():
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED, or FAILED for one that stopped half-way. TensorBoard
        also gets the config as hyperparameters beside the last round's metrics (its
        HParams tab compares runs by them)."""
        if self.writer is not None:
            if self.last_row is not None:
                self.writer.add_hparams(self.params, numeric(self.last_row), run_name="hparams")
            self.writer.close()
            self.writer = None
        if self.client is not None:
            self.client.set_terminated(self.run_id, status=status)
            self.client = None


REPORT_FILES = ("*.json", "*.png", "*.md")


def log_report(config: dict[str, Any], folder: Path) -> None:
    """A report's files (JSON, PNG, Markdown directly in `folder`) as the artefacts of
    one MLflow run named after the folder, in the config's experiment; TensorBoard
    holds no files, so a report logs to MLflow only."""
    tracker = Tracker({**config, "tracking": ["mlflow"]}, folder)
    for pattern in REPORT_FILES:
        for path in sorted(Path(folder).glob(pattern)):
            tracker.log_artifact(path)
    tracker.close()


def _mlflow_key(key: str) -> str:
    # MLflow's names take letters, digits and _ - . space : / only.
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)
