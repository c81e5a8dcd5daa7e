"""tosc and taco on sources other than the synthetic scenes: one federated round of each
(2 clients, in process) on a user's image folder and on the same data as a parquet
file read through Flower Datasets, tosc on scikit-learn's digits with all ten classes
in its stored teacher outputs, taco on digits (no masks: the task switch is off and
says so), what the task switch segments per source, and the refusals: a source without
labels, and distill.top_k past the source's classes."""

import json
import logging
import math

import pytest

from common.config import ConfigError, load_config
from common.data import DataError, num_classes
from fl_server.rounds import run_federated
from models.taco import task as taco_task
from models.taco import workload as taco
from models.tosc import workload as tosc
from tests.test_server_rounds import LoopbackGrid

# 32 examples for the clients and a public split of 12 after them: 44 of the 48 scenes.
CLIENTS, PUBLIC = 32, 12


def tosc_cfg(source, checkpoint, tmp_path, *extra):
    """A tiny tosc run: a ResNet-18 teacher of one epoch on the public split."""
    return load_config("configs/distill_quickstart.yaml", [
        *source, "num_clients=2", "rounds=1", f"data.num_samples={CLIENTS}",
        "data.partitioner=iid", "train.local_epochs=1", "train.batch_size=16",
        f"distill.teacher.public_samples={PUBLIC}", "distill.teacher.epochs=1",
        "distill.teacher.hidden=32", f"distill.teacher.checkpoint={checkpoint}",
        "channel.sweep_snr_db=[]", f"output_dir={tmp_path}", *extra])


def taco_cfg(source, checkpoint, tmp_path, *extra):
    """A tiny taco run: a small codec of one epoch on the public split."""
    return load_config("configs/taco_quickstart.yaml", [
        *source, "data.texture=flat", "num_clients=2", "rounds=1",
        f"data.num_samples={CLIENTS}", "train.local_epochs=1", "train.batch_size=16",
        "taco.eval_images=3", f"taco.codec.public_samples={PUBLIC}", "taco.codec.epochs=1",
        "taco.codec.block_out_channels=[8,16,16]", "taco.codec.codebook_size=64",
        f"taco.codec.checkpoint={checkpoint}", f"output_dir={tmp_path}", *extra])


def recorded_round(run_dir, keys):
    """The run's one round as metrics.json records it, its `keys` checked finite."""
    records = json.loads((run_dir / "metrics.json").read_text())
    assert records["status"] == "completed"
    (row,) = records["rounds"]
    assert row["clients_accepted"] == 2 and row["clients_rejected"] == 0, row
    for key in keys:
        assert key in row and math.isfinite(row[key]), (key, row)
    return row


TOSC_KEYS = ("train_loss", "loss_task", "loss_ib", "loss_kd", "accuracy", "eval_loss",
             "majority_class_share", "teacher_store_bytes")
TACO_KEYS = ("train_loss", "codec_mse", "accuracy", "accuracy_context", "accuracy_full",
             "kb_per_image", "psnr", "ssim", "receiver_exact", "majority_class_share")
SWITCH_KEYS = ("segmentation_loss", "switch_iou_before", "switch_iou_after", "switch_extra_kb")


@pytest.fixture(params=["folder", "parquet"])
def user_source(request):
    """(name, overrides) of the 48-scene image folder and of the same scenes as parquet."""
    return request.param, request.getfixturevalue(f"user_{request.param}")


def test_tosc_runs_a_round_on_a_users_labelled_data(user_source, pretrained_dir, tmp_path,
                                                    flower_message_context):
    name, source = user_source
    cfg = tosc_cfg(source, pretrained_dir / f"tosc-teacher-{name}.pt", tmp_path)
    assert num_classes(cfg.data) == 4
    run_federated(LoopbackGrid(2), cfg, tmp_path / "run")
    row = recorded_round(tmp_path / "run", TOSC_KEYS)
    assert row["loss_kd"] > 0 and row["teacher_store_bytes"] > 0


def test_taco_runs_a_round_with_the_task_switch_on_a_users_masks(user_source, pretrained_dir,
                                                                 tmp_path,
                                                                 flower_message_context):
    name, source = user_source
    # Both fixtures' masks are the scenes' (circle 1, square 2, triangle 3, cross 4). The
    # parquet's ClassLabel lists the classes in that order, so naming the mask ids says
    # that mask id k is label k - 1; the folder numbers its sorted sub-folders (circle,
    # cross, square, triangle), so there the switch segments every object.
    names = "data.seg_class_names=[circle,square,triangle,cross]"
    cfg = taco_cfg([*source, names], pretrained_dir / f"taco-codec-{name}.pt", tmp_path)
    expected = taco_task.SWITCH_CLASS if name == "parquet" else taco_task.SWITCH_FOREGROUND
    assert taco_task.switch_mode(cfg.data) == expected
    run_federated(LoopbackGrid(2), cfg, tmp_path / "run")
    row = recorded_round(tmp_path / "run", TACO_KEYS + SWITCH_KEYS)
    assert row["receiver_exact"] == 1.0


def test_tosc_on_digits_keeps_all_ten_classes_of_its_teacher(pretrained_dir, tmp_path,
                                                            flower_message_context):
    digits = ["data.name=digits", "data.image_size=16"]
    cfg = tosc_cfg(digits, pretrained_dir / "tosc-teacher-digits.pt", tmp_path,
                   "distill.top_k=10")  # more than the synthetic scenes' 4
    run_federated(LoopbackGrid(2), cfg, tmp_path / "run")
    row = recorded_round(tmp_path / "run", TOSC_KEYS)
    # float16 logits and uint8 classes, 10 of each per training example; the clients'
    # byte counts are averaged weighted by their examples.
    sizes = [len(tosc.load_data(cfg, pid, 2)[0]) for pid in range(2)]
    expected = sum(n * n * 10 * 3 for n in sizes) / sum(sizes)
    assert row["teacher_store_bytes"] == pytest.approx(expected)


def test_taco_on_a_source_without_masks_runs_with_the_task_switch_off(
        pretrained_dir, tmp_path, flower_message_context, caplog):
    digits = ["data.name=digits", "data.image_size=16"]
    cfg = taco_cfg(digits, pretrained_dir / "taco-codec-digits.pt", tmp_path)
    taco_task._logged.clear()
    with caplog.at_level(logging.WARNING, logger="fedsemcom"):
        run_federated(LoopbackGrid(2), cfg, tmp_path / "run")
    row = recorded_round(tmp_path / "run", TACO_KEYS)
    assert not set(SWITCH_KEYS) & set(row), row
    said = [r.getMessage() for r in caplog.records if "task switch off" in r.getMessage()]
    assert len(said) == 1, said  # once, though every client builds a model every round
    assert "needs segmentation" in said[0] and "data.name='digits'" in said[0]
    assert taco.build(cfg).segmenter is None


def test_the_task_switch_segments_the_foreground_when_mask_ids_are_not_labels(user_folder):
    cfg = taco_cfg(user_folder, "unused.pt", ".", "data.seg_classes=7")  # 6 mask classes
    assert taco_task.switch_mode(cfg.data) == taco_task.SWITCH_FOREGROUND
    model = taco.build(cfg)
    assert model.segmenter.net[-1].out_channels == 7
    synthetic = taco_cfg([], "unused.pt", ".")
    assert taco_task.switch_mode(synthetic.data) == taco_task.SWITCH_CLASS


@pytest.fixture(scope="module")
def unlabelled_parquet(tmp_path_factory):
    """Overrides for a parquet file of 24 images and no other column."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
              for _ in range(24)]
    ds = datasets.Dataset.from_dict({"image": images},
                                    features=datasets.Features({"image": datasets.Image()}))
    path = tmp_path_factory.mktemp("unlabelled") / "train.parquet"
    ds.to_parquet(str(path))
    return ["data.name=hf", "data.hf_dataset=parquet", f"data.data_files=[{path}]"]


@pytest.mark.parametrize("workload", ["tosc", "taco"])
def test_a_source_without_labels_is_refused_before_anything_trains(
        workload, unlabelled_parquet, tmp_path, flower_message_context):
    make, module = {"tosc": (tosc_cfg, tosc), "taco": (taco_cfg, taco)}[workload]
    cfg = make(unlabelled_parquet, tmp_path / "weights.pt", tmp_path, "data.num_samples=8")
    refusal = r"task 'classification' needs label \('label'\).*data.name='hf'.*label_column"
    with pytest.raises(DataError, match=refusal):
        run_federated(LoopbackGrid(2), cfg, tmp_path / "run")  # the server's prepare
    with pytest.raises(DataError, match=refusal):
        module.load_data(cfg, 0, 2)  # a client
    assert not (tmp_path / "weights.pt").exists()


def test_distill_top_k_is_checked_against_the_sources_classes(user_folder, tmp_path):
    # The config check cannot read the source; the server's prepare and a client can.
    cfg = tosc_cfg(user_folder, tmp_path / "teacher.pt", tmp_path, "distill.top_k=5")
    for check in (lambda: tosc.prepare(cfg), lambda: tosc.load_data(cfg, 0, 2)):
        with pytest.raises(ConfigError, match=r"distill.top_k.*got 5.*1 \.\. 4 \(data.name="
                                              r"'folder' has 4 classes\)"):
            check()
    assert not (tmp_path / "teacher.pt").exists()
    with pytest.raises(ConfigError, match=r"distill.top_k.*1 \.\. 4 \(the synthetic scenes"):
        load_config("configs/distill_quickstart.yaml", ["distill.top_k=5"])


@pytest.mark.parametrize("source", [[], ["data.name=digits", "data.image_size=32"]],
                         ids=["synthetic", "digits"])
def test_the_taco_report_judges_a_run_with_and_without_masks(source, pretrained_dir, tmp_path,
                                                             flower_message_context):
    from reports import taco as taco_report

    name = "taco-codec-digits32.pt" if source else "taco-codec-synthetic-tiny.pt"
    run_dir = tmp_path / "run"
    cfg = taco_cfg(source, pretrained_dir / name, tmp_path, "taco.link.images=2",
                   "taco.link.sweep_snr_db=[10]", "taco.link.channels=[awgn]",
                   f"client_state_dir={run_dir / 'client-state'}")
    federated = run_federated(LoopbackGrid(cfg.num_clients), cfg, run_dir)
    report = taco_report.build_report(cfg, run_dir, federated)
    assert 0 <= report["methods"]["taco LSF"]["accuracy"] <= 1
    assert report["link"][0]["images"] == 2 * cfg.num_clients
    switch = report["task_switch"]
    if source:  # digits have no masks: the switch is off, and the report says so
        assert switch is None
    else:
        assert switch["images"] == 3 * cfg.num_clients
        assert 0 <= switch["iou_before"] <= 1 and 0 <= switch["iou_after"] <= 1
