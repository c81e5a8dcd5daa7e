"""Run tracking (common/tracking.py): a run logged to TensorBoard and MLflow as it goes,
read back through each tool's own reader; off by default, and a tracker name checked."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_server_rounds import LoopbackGrid

from common.config import ConfigError, load_config
from fl_server.rounds import run_federated

QUICKSTART = "configs/quickstart.yaml"
ROOT = Path(__file__).resolve().parent.parent


def test_a_run_logs_every_round_to_tensorboard_and_mlflow(flower_message_context, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    cfg = load_config(QUICKSTART, [
        "num_clients=3", "rounds=2", "data.num_samples=240", "train.local_epochs=1",
        "train.batch_size=16",
        "name=tracked", f"output_dir={tmp_path / 'runs'}", "tracking=[tensorboard, mlflow]",
        f"tracking_uri={uri}"])
    run_dir = tmp_path / "runs" / "tracked-run"
    results = run_federated(LoopbackGrid(cfg.num_clients), cfg, run_dir)
    rows = results["rounds"]
    assert [r["round"] for r in rows] == [1, 2]

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked-run"
    assert run.data.params["name"] == "tracked" and run.data.params["lora.rank"] == "8"
    assert run.data.params["tracking"] == "['tensorboard', 'mlflow']"
    for key in ("accuracy", "train_loss"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted((m.step, m.value) for m in history) == [(r["round"], r[key]) for r in rows]
    # Each client's own metrics, by node id, every round: the train losses the server
    # averaged (weighted by examples) into the round's train_loss.
    client_keys = [k for k in run.data.metrics if k.startswith("clients/")]
    train_keys = sorted(k for k in client_keys if k.endswith("/train/train_loss"))
    eval_keys = sorted(k for k in client_keys if k.endswith("/evaluate/accuracy"))
    assert len(train_keys) == len(eval_keys) == 3
    for rnd in (1, 2):
        losses = [next(m.value for m in client.get_metric_history(run.info.run_id, k)
                       if m.step == rnd) for k in train_keys]
        row = rows[rnd - 1]
        assert min(losses) <= row["train_loss"] <= max(losses)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "metrics.png"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / "dl"))
    assert json.loads(open(local).read())["status"] == "completed"

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for key in ("accuracy", "train_loss", "bytes_up"):
        scalars = events.Scalars(key)
        assert [(s.step, pytest.approx(s.value)) for s in scalars] == [
            (r["round"], r[key]) for r in rows]
    assert "config/text_summary" in events.Tags()["tensors"]  # the config, as text
    assert len([t for t in events.Tags()["scalars"] if t.startswith("clients/")]) >= 6
    hparams = EventAccumulator(str(run_dir / "tensorboard" / "hparams"))
    hparams.Reload()  # the HParams plugin's summary and the last round's metrics
    start = plugin_data_pb2.HParamsPluginData.FromString(
        hparams.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["lora.rank"].string_value == "8"
    assert hparams.Scalars("accuracy")[0].value == pytest.approx(rows[-1]["accuracy"])
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # tracking_uri was used


def test_tracking_is_off_by_default_and_writes_nothing(tiny_cfg, flower_message_context,
                                                       tmp_path):
    assert tiny_cfg.tracking == [] and tiny_cfg.tracking_uri is None
    cfg = dataclasses.replace(tiny_cfg, rounds=1, output_dir=str(tmp_path))
    run_federated(LoopbackGrid(cfg.num_clients), cfg, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert not list(tmp_path.rglob("mlflow.db")) and not list(tmp_path.rglob("mlartifacts"))


@pytest.mark.parametrize("overrides, words", [
    (["tracking=[wandb]"], ["'tracking'", "wandb", "tensorboard", "mlflow"]),
    (["tracking=[mlflow, mlflow]"], ["'tracking'", "distinct"]),
    (["tracking_uri=sqlite:///x.db"], ["'tracking_uri'", "mlflow"]),
])
def test_a_bad_tracking_config_names_the_valid_trackers(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, overrides)
    for word in words:
        assert word in str(err.value)


def test_checking_a_tracked_config_imports_neither_tracker():
    code = ("import sys\nfrom common.config import load_config\n"
            "load_config('configs/quickstart.yaml', ['tracking=[tensorboard, mlflow]'])\n"
            "import common.records\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('mlflow', 'tensorboard')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_a_run_that_fails_half_way_ends_failed_in_the_default_store(tmp_path):
    from mlflow.tracking import MlflowClient

    from common.records import RunRecorder

    config = {"name": "halfway", "output_dir": str(tmp_path), "tracking": ["mlflow"],
              "tracking_uri": None, "train": {"lr": 0.002}}
    records = RunRecorder(tmp_path / "halfway-run", config)
    records.add_round({"round": 1, "train_loss": 2.5, "dp_epsilon_max": 0.7})
    records.finish("failed", error="RuntimeError: stopped")

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("halfway").experiment_id])
    assert run.info.status == "FAILED" and run.data.params["train.lr"] == "0.002"
    assert run.data.metrics == {"train_loss": 2.5, "dp_epsilon_max": 0.7}
    assert "metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert (tmp_path / "mlartifacts").is_dir()  # beside the store, not in the cwd


def test_a_reports_files_become_the_artefacts_of_one_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from reports.cli import track_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "separate_report-1"
    (folder / "run").mkdir(parents=True)
    for name in ("report.json", "report.png", "report.md", "run/metrics.json"):
        (folder / name).write_text("{}")
    track_report(load_config(QUICKSTART, [f"output_dir={tmp_path}"]), folder)  # tracking off
    assert not (tmp_path / "mlflow.db").exists()
    cfg = load_config(QUICKSTART, ["name=reported", "tracking=[mlflow]", f"tracking_uri={uri}"])
    track_report(cfg, folder)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("reported").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "separate_report-1"
    # the report's own files; the run it trained is tracked as a run of its own
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == [
        "report.json", "report.md", "report.png"]


def test_a_benchmarks_results_become_the_artefacts_of_an_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from benchmarks.__main__ import SECTIONS, main

    out = tmp_path / "bench"
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    skip = [s for s in SECTIONS if s != "lora"]  # the one section of a few seconds
    assert main(["--skip", *skip, "--out", str(out), "--mlflow", "--tracking-uri", uri]) == 0
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("benchmarks").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "bench"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"bench.json",
                                                                        "bench.png"}
    assert json.loads((out / "bench.json").read_text())["lora"][0]["model"] == "quickstart"
