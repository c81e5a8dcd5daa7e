"""Users' own data: image folders, Hugging Face datasets (parquet through Flower
Datasets), scikit-image's photos, every partitioner, and the layout of a finite source
(clients, public split, held out)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import data as D
from common.config import ConfigError, DataConfig, load_config
from common.data import sources as SRC
from common.data.scenes import CLASSES, WORD_TO_ID
from tests.user_data import HEIGHT, WIDTH, scene_records, write_image_folder


def data_cfg(overrides: list[str], *extra: str) -> DataConfig:
    cfg = load_config("configs/quickstart.yaml",
                      [*overrides, "model.tasks=[classification]", "num_clients=2", *extra])
    return cfg.data


@pytest.mark.parametrize("layout", ["user_folder", "user_parquet"])
def test_a_users_source_gives_images_labels_masks_and_texts(layout, request):
    cfg = data_cfg(request.getfixturevalue(layout), "data.num_samples=48",
                   "data.partitioner=iid")
    records = scene_records(48)
    assert D.source_size(cfg) == 48 and D.num_classes(cfg) == 4 and D.seg_classes(cfg) == 5
    assert set(D.class_names(cfg)) == set(CLASSES)
    assert {"label", "segmentation", "caption", "question", "answer"} <= D.source_keys(cfg)
    vocab = D.text_vocab(cfg)
    seen = set()
    for pid in range(2):
        for part in D.load_partition(cfg, pid, 2):
            x, seg = part.tensors["image"], part.tensors["segmentation"]
            assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
            assert 0 <= x.min() and x.max() <= 1 and seg.shape[1:] == (32, 32)
            assert set(seg.unique().tolist()) <= set(range(5))
            for k, i in enumerate(part.indices):
                seen.add(int(i))
                if layout == "user_parquet":  # parquet rows are the scenes in order
                    r = records[int(i)]
                    assert D.class_names(cfg)[int(part.tensors["label"][k])] == \
                        CLASSES[r["label"]]
                    assert vocab.decode(part.tensors["caption"][k]) == r["caption"]
                    assert vocab.decode(part.tensors["question"][k]) == r["question"]
                    assert vocab.answers[int(part.tensors["answer"][k])] == r["answer"]
                # the mask's objects lie where the image is bright (the background is dark)
                fg = seg[k] > 0
                assert x[k].mean(0)[fg].mean() > x[k].mean(0)[~fg].mean() + 0.1
    assert seen == set(range(48))  # two disjoint partitions cover the source


def test_the_folder_layout_resizes_the_shorter_side_and_keeps_the_centre(user_folder):
    cfg = data_cfg(user_folder, "data.num_samples=48", "data.partitioner=iid",
                   f"data.image_size={HEIGHT}")
    src = SRC.get_source(cfg)
    x = src.examples([0], HEIGHT)["image"][0]
    full = src.read_images(np.array([0]))[0]
    assert full.shape == (3, HEIGHT, WIDTH)  # the file as written
    left = (WIDTH - HEIGHT) // 2
    assert torch.allclose(x, full[:, :, left:left + HEIGHT])  # no resize: the centre crop


def test_a_source_that_lacks_what_a_task_needs_says_how_to_add_it(tmp_path):
    images, _ = write_image_folder(tmp_path, n=8, masks=False, texts=False)
    cfg = data_cfg(["data.name=folder", f"data.root={images}"], "data.num_samples=8",
                   "data.partitioner=iid")
    with pytest.raises(D.DataError, match=r"task 'captioning' needs caption \('caption'\).*"
                       r"metadata.jsonl"):
        D.load_partition(cfg, 0, 2, needs={"caption": "captioning"})
    with pytest.raises(D.DataError, match="segmentation.*data.masks_root"):
        D.seg_classes(cfg)
    tr, te = D.load_partition(cfg, 0, 2, needs={"label": "classification"})
    assert set(tr.tensors) == {"image", "label"}


def test_bad_folders_and_metadata_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="data.root.*one sub-folder per class"):
        D.load_partition(DataConfig(name="folder", root=str(tmp_path / "nowhere")), 0, 2)
    images, masks = write_image_folder(tmp_path / "a", n=6)
    lines = (images / "metadata.jsonl").read_text().splitlines()
    (images / "metadata.jsonl").write_text("\n".join(lines[:-1] + ['{"file_name": 3']))
    with pytest.raises(ConfigError, match="metadata.jsonl line 6: not a JSON object"):
        D.load_partition(DataConfig(name="folder", root=str(images)), 0, 2)
    next(masks.rglob("*.png")).unlink()
    (images / "metadata.jsonl").write_text("\n".join(lines))
    with pytest.raises(ConfigError, match="masks_root.*lacks 1 of 6 masks"):
        D.load_partition(DataConfig(name="folder", root=str(images), masks_root=str(masks)),
                         0, 2)


def test_an_unlabelled_hf_dataset_partitions_iid_only_and_a_hub_name_needs_allow_hub(tmp_path):
    import datasets

    path = tmp_path / "unlabelled.parquet"
    images = [r["image"] for r in scene_records(12)]
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features(
        {"image": datasets.Image()})).to_parquet(str(path))
    base = dict(name="hf", hf_dataset="parquet", data_files=[str(path)], num_samples=12)
    tr, _ = D.load_partition(DataConfig(**base, partitioner="iid"), 0, 2)
    assert set(tr.tensors) == {"image"}
    with pytest.raises(ConfigError, match="dirichlet.*splits by label.*data.partitioner=iid"):
        D.load_partition(DataConfig(**base, partitioner="dirichlet"), 0, 2)
    with pytest.raises(ConfigError, match="task 'classification' needs label"):
        D.load_partition(DataConfig(**base, partitioner="iid"), 0, 2,
                         needs={"label": "classification"})
    with pytest.raises(ConfigError, match="hub dataset and needs the network.*allow_hub"):
        D.source_size(DataConfig(name="hf", hf_dataset="someone/some-dataset"))
    with pytest.raises(ConfigError, match="image_column='picture'.*columns are"):
        D.source_size(DataConfig(**base, image_column="picture"))


def test_photos_are_real_patches_the_same_on_every_call_with_the_photo_as_natural_id():
    cfg = DataConfig(name="photos", num_samples=10_000, partitioner="natural_id")
    patches, labels, ids = SRC.photo_patches()
    assert patches.dtype == np.uint8 and patches.shape[1:] == (3, 64, 64)
    assert len(patches) == D.source_size(cfg) == 720 and len(SRC.PHOTOS) == 9
    assert D.num_classes(cfg) == 8  # the stereo pair is one scene
    assert patches.reshape(len(patches), -1).std(1).mean() > 20  # not flat: real texture
    sizes = []
    for pid in range(9):
        tr, te = D.load_partition(cfg, pid, 9)
        owners = set(ids[np.concatenate([tr.indices, te.indices])].tolist())
        assert owners == {pid}  # natural id: one photo per client
        sizes.append(len(tr) + len(te))
    assert sum(sizes) == 720
    with pytest.raises(ValueError, match="num_clients=9"):
        D.load_partition(cfg, 0, 4)
    again, _ = D.load_partition(DataConfig(name="photos", num_samples=100, partitioner="iid",
                                           seed=3), 0, 2)
    assert torch.equal(again.tensors["image"],
                       D.examples(DataConfig(name="photos"), again.indices).tensors["image"])


@pytest.mark.filterwarnings("ignore:Classes")
@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological", "shard"])
def test_every_partitioner_gives_disjoint_partitions_of_the_clients_examples(partitioner):
    cfg = DataConfig(name="digits", num_samples=600, partitioner=partitioner, alpha=0.3,
                     classes_per_partition=2, shards_per_partition=2)
    pool = set(D.client_pool(cfg).tolist())
    assert len(pool) == 600
    parts = [np.concatenate([p.indices for p in D.load_partition(cfg, i, 5)]) for i in range(5)]
    everything = np.concatenate(parts)
    assert len(set(everything.tolist())) == len(everything)  # disjoint
    assert set(everything.tolist()) <= pool
    assert min(len(p) for p in parts) >= 2
    labels = SRC.get_source(cfg).labels
    per_client = [len(np.unique(labels[p])) for p in parts]
    if partitioner == "pathological":
        assert max(per_client) == 2
        # 5 x 2 class slots may draw fewer than the 10 classes: every example of a class
        # some partition drew is assigned, the others are left out (Flower warns).
        drawn = set(labels[everything].tolist())
        assert set(everything.tolist()) == {i for i in pool if labels[i] in drawn}
    elif partitioner == "iid":
        assert set(everything.tolist()) == pool and min(per_client) == 10
    else:
        assert set(everything.tolist()) == pool


def test_a_real_source_is_laid_out_clients_then_public_then_held_out():
    cfg = DataConfig(name="digits", num_samples=1000)
    order = D.source_order(cfg)
    assert sorted(order.tolist()) == list(range(1797))
    assert list(D.client_pool(cfg)) == list(order[:1000])
    public = D.public_indices(cfg, 300, "distill.teacher.public_samples")
    held = D.held_out_pool(cfg, 300)
    assert list(public) == list(order[1000:1300]) and list(held) == list(order[1300:])
    assert not np.array_equal(order[:20], np.arange(20))  # seeded, not the file order
    assert not np.array_equal(order, D.source_order(DataConfig(name="digits", seed=1)))


def test_the_synthetic_vocabulary_is_the_scenes_own():
    vocab = D.text_vocab(DataConfig())
    assert vocab.words[:4] == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert {w: i for i, w in enumerate(vocab.words)} == WORD_TO_ID


def test_a_users_parquet_and_folder_agree_on_the_examples(user_folder, user_parquet):
    """The same scenes written two ways load as the same images (up to the row order)."""
    f = data_cfg(user_folder, "data.num_samples=48", "data.partitioner=iid")
    p = data_cfg(user_parquet, "data.num_samples=48", "data.partitioner=iid")
    fx = SRC.get_source(f).examples(np.arange(48), 32)["image"]
    px = SRC.get_source(p).examples(np.arange(48), 32)["image"]
    key = lambda x: sorted(x.flatten(1).sum(1).round(decimals=3).tolist())  # noqa: E731
    assert key(fx) == key(px)


def test_mask_ids_past_seg_classes_are_refused_and_a_changed_mask_changes_the_fingerprint(
        tmp_path):
    import os

    from PIL import Image

    images, masks = write_image_folder(tmp_path, n=6, texts=False)
    cfg = DataConfig(name="folder", root=str(images), masks_root=str(masks), num_samples=6,
                     partitioner="iid", seg_classes=3)
    with pytest.raises(ConfigError, match=r"holds id [34], outside 0 .. 2: raise "
                       "data.seg_classes"):
        SRC.get_source(cfg).examples(np.arange(6), 32)
    before = D.source_fingerprint(DataConfig(name="folder", root=str(images),
                                             masks_root=str(masks)))
    mask = next(masks.rglob("*.png"))
    Image.fromarray(np.zeros((HEIGHT, WIDTH), np.uint8)).save(mask)
    os.utime(mask, (1, 1))  # a new file time, whatever the clock's resolution
    SRC._get_source.cache_clear()
    after = D.source_fingerprint(DataConfig(name="folder", root=str(images),
                                            masks_root=str(masks)))
    assert after != before
