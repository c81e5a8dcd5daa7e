"""The diffusion workload on users' own data: one federated round of real Flower messages
on an image folder with masks, on the same scenes as parquet read through Flower
Datasets (tests/user_data.py) and as parquet without labels (the workload needs masks,
not labels); the mask classes' names; a source without masks refused with how to add
them."""

import json
import logging
import math

import pytest
import torch

from common.data import DataError, load_partition
from fl_server.rounds import run_federated
from models.diffusion import workload as diffusion
from models.diffusion.classes import main_object, mask_classes
from tests.test_diffusion import tiny_cfg
from tests.test_server_rounds import LoopbackGrid
from tests.user_data import parquet_overrides, scene_records

DEPTH_METRICS = {k for k in diffusion.EVAL_METRICS if k.startswith("depth_")}


def user_cfg(checkpoint, source, *extra):
    """The tiny diffusion config on 32 of the 48 scenes for 2 clients, 12 public."""
    return tiny_cfg(checkpoint, *source, "num_clients=2", "rounds=1", "data.num_samples=32",
                    "diffusion.public_samples=12", "data.partitioner=iid", "train.batch_size=8",
                    "diffusion.eval_samples=4", *extra)


@pytest.fixture(scope="module")
def unlabelled_parquet(tmp_path_factory):
    """The 48 scenes as parquet with images and masks only."""
    import datasets

    rows = scene_records(48)
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    ds = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features},
                                    features=features)
    path = tmp_path_factory.mktemp("unlabelled") / "train.parquet"
    ds.to_parquet(str(path))
    return parquet_overrides(path)


@pytest.mark.parametrize("source", ["user_folder", "user_parquet", "unlabelled_parquet"])
def test_one_round_on_user_data_with_masks_records_finite_metrics(
        source, request, tmp_path, flower_message_context, caplog):
    cfg = user_cfg(tmp_path / "ddpm.pt", request.getfixturevalue(source))
    classes = mask_classes(cfg.data)
    # The masks hold background and the four shapes; no depth maps.
    assert classes.count == 5 and not classes.depth
    with caplog.at_level(logging.WARNING):
        results = run_federated(LoopbackGrid(2), cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == "completed"
    [row] = saved["rounds"]
    assert row == results["rounds"][0]
    assert row["clients_accepted"] == 2
    expected = (set(diffusion.TRAIN_METRICS) | set(diffusion.EVAL_METRICS)) - DEPTH_METRICS
    assert expected <= set(row), expected - set(row)
    assert not DEPTH_METRICS & set(row)  # switched off, not NaN
    bad = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
    assert not bad, bad
    assert row["bytes_phase1"] > 0 and row["bytes_feedback"] == 1.0
    assert any("no depth maps" in r.getMessage() for r in caplog.records)


def test_mask_classes_are_named_as_the_config_says_else_class_k(
        user_parquet, unlabelled_parquet, tmp_path):
    """Mask id k is named by data.seg_class_names, else "class k" (a mask does not say
    what its ids mean); the class head's target is each mask's main object."""
    named = user_parquet + ["data.seg_class_names=[circle,square,triangle,cross]"]
    assert mask_classes(user_cfg(tmp_path / "x.pt", named).data).names == (
        "circle", "square", "triangle", "cross")
    with pytest.raises(DataError, match="seg_class_names has 2 names.*4 object ids"):
        mask_classes(user_cfg(tmp_path / "x.pt", user_parquet
                              + ["data.seg_class_names=[a,b]"]).data)
    for source in (user_parquet, user_parquet + ["data.seg_classes=7"], unlabelled_parquet):
        classes = mask_classes(user_cfg(tmp_path / "x.pt", source).data)
        assert classes.names == tuple(f"class {k}" for k in range(1, classes.count))
    cfg = user_cfg(tmp_path / "x.pt", user_parquet)
    train, _ = load_partition(cfg.data, 0, 2)
    seg = train.tensors["segmentation"][:2].clone()
    seg[0] = 0  # no object: no main class
    seg[1, :, :] = 0
    seg[1, :3, :3], seg[1, 5:, 5:] = 2, 4  # 9 pixels of id 2, far more of id 4
    assert main_object({"segmentation": seg}, mask_classes(cfg.data)).tolist() == [-1, 3]
    assert torch.equal(main_object({"segmentation": seg[1:]}, mask_classes(cfg.data)),
                       torch.tensor([3]))


def test_a_source_without_masks_is_refused_with_how_to_add_them(tmp_path):
    cfg = user_cfg(tmp_path / "ddpm.pt", ["data.name=photos"])  # the config itself is fine
    for refused in (lambda: run_federated(LoopbackGrid(2), cfg, tmp_path / "run"),
                    lambda: diffusion.load_data(cfg, 0, 2)):
        with pytest.raises(DataError, match="segmentation") as err:
            refused()
        assert "masks_root" in str(err.value) and "mask_column" in str(err.value)
    assert not (tmp_path / "ddpm.pt").exists()  # refused before anything trained
