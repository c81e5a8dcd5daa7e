"""Behaviour of common/data/: scenes are deterministic and their labels, captions,
answers and boxes are true for the rendered pixels; partitions are disjoint, complete,
non-empty and label-skewed when asked; real-data loaders fail loudly without files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from common import data as D
from common.config import DataConfig
from common.data import partition as P
from common.data import scenes as S
from common.data import sources as SRC
from common.data.text import SYNTHETIC_VOCAB

SIZE = 32


def synthetic(**overrides) -> DataConfig:
    return DataConfig(**{"name": "synthetic", "num_samples": 400, "image_size": SIZE,
                         "max_objects": 4, "seed": 0, **overrides})


@pytest.fixture(scope="module")
def scenes() -> S.SyntheticScenes:
    return S.SyntheticScenes(synthetic(), range(300))


def nearest_colour(pixel: torch.Tensor) -> str:
    names = list(S.COLORS)
    rgb = torch.tensor([S.COLORS[n] for n in names])
    return names[int(((rgb - pixel) ** 2).sum(1).argmin())]


def pixel_at(x: float, y: float) -> tuple[int, int]:
    """(row, column) of the pixel containing the normalised point (x, y)."""
    return min(int(y * SIZE), SIZE - 1), min(int(x * SIZE), SIZE - 1)


def box_centre(box: torch.Tensor) -> tuple[float, float]:
    x0, y0, x1, y1 = box.tolist()
    return (x0 + x1) / 2, (y0 + y1) / 2


# --------------------------------------------------------------------------- scenes


def test_items_have_the_documented_shapes_and_dtypes(scenes):
    item = scenes[0]
    expected = {
        "image": ((3, SIZE, SIZE), torch.float32),
        "label": ((), torch.int64),
        "segmentation": ((SIZE, SIZE), torch.int64),
        "depth": ((SIZE, SIZE), torch.float32),
        "boxes": ((4, 4), torch.float32),
        "num_objects": ((), torch.int64),
        "caption": ((12,), torch.int64),
        "question": ((S.QUESTION_LEN,), torch.int64),
        "answer": ((), torch.int64),
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in item.items()} == expected
    images = scenes.tensors["image"]
    assert images.min() >= 0 and images.max() <= 1
    assert scenes.tensors["num_objects"].min() >= 1
    assert scenes.tensors["num_objects"].max() <= 4


def test_same_seed_reproduces_and_other_seed_differs(scenes):
    again = S.SyntheticScenes(synthetic(), range(300))
    for key, value in scenes.tensors.items():
        assert torch.equal(value, again.tensors[key]), key
    alone = S.SyntheticScenes(synthetic(), [7])[0]  # one index, without its neighbours
    for key, value in alone.items():
        assert torch.equal(value, scenes[7][key]), key
    other = S.SyntheticScenes(synthetic(seed=1), range(300))
    differs = (other.tensors["image"] - scenes.tensors["image"]).abs().amax((1, 2, 3)) > 0.1
    assert differs.all()
    same_caption = (other.tensors["caption"] == scenes.tensors["caption"]).all(1)
    assert same_caption.float().mean() < 0.2


def test_label_is_the_largest_object_and_is_visible(scenes):
    for i in range(len(scenes)):
        item = scenes[i]
        label = int(item["label"])
        assert (item["segmentation"] == label + 1).any(), i
        spec = S.scene_spec(0, i, 4)
        assert label == max(spec, key=lambda o: o.area).class_id
    labels = scenes.tensors["label"].numpy()
    assert np.array_equal(labels, S.synthetic_labels(synthetic(num_samples=300)))
    assert set(labels.tolist()) == set(range(len(S.CLASSES)))  # every class occurs


def test_every_object_is_visible_in_its_colour(scenes):
    """The centre of every object shows its own class and colour after painting."""
    for i in range(len(scenes)):
        item = scenes[i]
        for obj in S.scene_spec(0, i, 4):
            r, c = pixel_at(*obj.center)
            assert item["segmentation"][r, c] == obj.class_id + 1, i
            assert nearest_colour(item["image"][:, r, c]) == obj.color, i


def test_caption_names_the_label_first(scenes):
    for i in range(len(scenes)):
        item = scenes[i]
        caption = item["caption"]
        assert caption[0] == S.BOS_ID and (caption == S.EOS_ID).sum() == 1
        end = int((caption == S.EOS_ID).nonzero())
        assert (caption[end + 1:] == S.PAD_ID).all()
        words = SYNTHETIC_VOCAB.decode(caption).split()
        first_noun = next(w for w in words if w in S.CLASSES)
        assert first_noun == S.CLASSES[int(item["label"])], (i, words)
        r, c = pixel_at(*box_centre(item["boxes"][0]))  # the largest object
        assert words[2] == nearest_colour(item["image"][:, r, c])


def test_vqa_answers_are_true_for_the_pixels(scenes):
    asked = {"count": 0, "exists": 0, "colour": 0, "shape": 0}
    yes = 0
    for i in range(len(scenes)):
        item = scenes[i]
        question = SYNTHETIC_VOCAB.decode(item["question"]).split()
        answer = S.ANSWERS[int(item["answer"])]
        seg, image = item["segmentation"], item["image"]
        if question[:2] == ["how", "many"]:
            asked["count"] += 1
            assert answer == S.COUNT_WORDS[int(item["num_objects"]) - 1]
            assert int(item["num_objects"]) == int((item["boxes"].sum(1) > 0).sum())
        elif question[:2] == ["is", "there"]:
            asked["exists"] += 1
            present = bool((seg == S.CLASSES.index(question[3]) + 1).any())
            assert answer == ("yes" if present else "no"), (i, question)
            yes += answer == "yes"
        elif question[:3] == ["what", "color", "is"]:
            asked["colour"] += 1
            assert question[-1] == S.CLASSES[int(item["label"])]
            r, c = pixel_at(*box_centre(item["boxes"][0]))
            assert seg[r, c] == int(item["label"]) + 1
            assert answer == nearest_colour(image[:, r, c]), (i, question)
        elif question[:3] == ["what", "shape", "is"]:
            asked["shape"] += 1
            rgb = torch.tensor(S.COLORS[question[4]])[:, None, None]
            of_colour = ((image - rgb) ** 2).sum(0) < 0.02
            assert of_colour.any()
            assert set(seg[of_colour].unique().tolist()) == {S.CLASSES.index(answer) + 1}
        else:
            pytest.fail(f"unexpected question {question}")
    assert all(n >= 30 for n in asked.values()), asked
    assert 0.3 < yes / asked["exists"] < 0.7  # yes/no roughly balanced


def test_boxes_enclose_each_object(scenes):
    ys, xs = torch.meshgrid(*(torch.arange(SIZE) + 0.5,) * 2, indexing="ij")
    ys, xs = ys / SIZE, xs / SIZE
    for i in range(0, len(scenes), 5):
        item = scenes[i]
        n = int(item["num_objects"])
        boxes = item["boxes"]
        assert (boxes[n:] == 0).all()
        assert (boxes[:n, 2] > boxes[:n, 0]).all() and (boxes[:n, 3] > boxes[:n, 1]).all()
        inside_any = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        for x0, y0, x1, y1 in boxes[:n].tolist():
            inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
            assert (item["segmentation"][inside] > 0).any()  # no empty box
            inside_any |= inside
        assert not (item["segmentation"] > 0)[~inside_any].any()  # no pixel outside
        for k, obj in enumerate(S.scene_spec(0, i, 4)):  # each object on its own
            alone = S.render_scene([obj], SIZE)
            x0, y0, x1, y1 = boxes[k].tolist()
            rows, cols = np.nonzero(alone["segmentation"])
            assert rows.size > 0
            assert x0 <= (cols.min() + 0.5) / SIZE and (cols.max() + 0.5) / SIZE <= x1
            assert y0 <= (rows.min() + 0.5) / SIZE and (rows.max() + 0.5) / SIZE <= y1


def test_decode_tokens_stops_at_eos_and_skips_padding():
    ids = S.encode_tokens(["a", "big", "red", "circle"], 10)
    assert SYNTHETIC_VOCAB.decode(ids) == "a big red circle"
    assert SYNTHETIC_VOCAB.decode([S.BOS_ID, S.WORD_TO_ID["yes"], S.EOS_ID, S.WORD_TO_ID["no"]]) == "yes"
    assert all(w in S.WORD_TO_ID for w in S.ANSWERS)


def test_short_captions_keep_the_largest_object():
    item = S.SyntheticScenes(synthetic(), range(20), caption_len=6)
    for i in range(20):
        words = SYNTHETIC_VOCAB.decode(item[i]["caption"]).split()
        assert len(words) == 4 and words[3] == S.CLASSES[int(item[i]["label"])]
    with pytest.raises(ValueError, match="caption_len=5"):
        S.SyntheticScenes(synthetic(), range(2), caption_len=5)


# --------------------------------------------------------------------------- partitions


def all_partitions(labels, num_partitions, cfg):
    return [P.partition_indices(labels, num_partitions, pid, cfg) for pid in range(num_partitions)]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_all_samples(partitioner):
    cfg = synthetic(num_samples=1000, partitioner=partitioner, alpha=0.5)
    labels = S.synthetic_labels(cfg)
    parts = all_partitions(labels, 10, cfg)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == 1000
    assert all(len(p) >= 2 for p in parts)
    assert np.array_equal(parts[3], P.partition_indices(labels, 10, 3, cfg))  # deterministic


def mean_label_entropy(parts, labels) -> float:
    entropies = []
    for p in parts:
        share = np.bincount(labels[p], minlength=len(S.CLASSES)) / len(p)
        share = share[share > 0]
        entropies.append(-(share * np.log(share)).sum())
    return float(np.mean(entropies))


@pytest.mark.filterwarnings("ignore:Dirichlet partitioning")
def test_dirichlet_with_small_alpha_is_label_skewed():
    iid = synthetic(num_samples=2000, partitioner="iid")
    skewed = synthetic(num_samples=2000, partitioner="dirichlet", alpha=0.1)
    labels = S.synthetic_labels(iid)
    h_iid = mean_label_entropy(all_partitions(labels, 20, iid), labels)
    h_skewed = mean_label_entropy(all_partitions(labels, 20, skewed), labels)
    assert h_iid > 0.9 * np.log(len(S.CLASSES))  # near uniform
    assert h_skewed < 0.6 * h_iid


@pytest.mark.parametrize("alpha", [0.5, 0.1])
def test_hundred_partitions_are_all_non_empty(alpha):
    cfg = synthetic(num_samples=3000, partitioner="dirichlet", alpha=alpha)
    labels = S.synthetic_labels(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # alpha=0.1 needs topping up, and says so
        parts = all_partitions(labels, 100, cfg)
    assert min(len(p) for p in parts) >= 2
    assert len(np.unique(np.concatenate(parts))) == sum(len(p) for p in parts) == 3000


def test_bad_partition_arguments_name_the_value():
    cfg = synthetic(num_samples=50)
    labels = S.synthetic_labels(cfg)
    with pytest.raises(ValueError, match="partition_id=10"):
        P.partition_indices(labels, 10, 10, cfg)
    with pytest.raises(ValueError, match="partition_id=-1"):
        P.partition_indices(labels, 10, -1, cfg)
    with pytest.raises(ValueError, match="num_partitions=0"):
        P.partition_indices(labels, 0, 0, cfg)
    with pytest.raises(ValueError, match="num_partitions=51"):
        P.partition_indices(labels, 51, 0, cfg)


def test_load_partition_splits_locally_and_is_cached():
    cfg = synthetic(num_samples=600, partitioner="dirichlet", alpha=0.5, test_fraction=0.2)
    train, test = D.load_partition(cfg, 2, 10)
    assert D.load_partition(cfg, 2, 10)[0] is train  # cached per process
    ours = P.partition_indices(S.synthetic_labels(cfg), 10, 2, cfg)
    assert set(train.indices) | set(test.indices) == set(ours.tolist())
    assert not set(train.indices) & set(test.indices)
    assert len(test) == max(1, round(0.2 * len(ours)))
    assert torch.equal(train[0]["image"], S.SyntheticScenes(cfg, [train.indices[0]])[0]["image"])
    train_b, _ = D.load_partition(cfg, 3, 10)
    assert not set(train.indices) & set(train_b.indices)


@pytest.mark.filterwarnings("ignore:Dirichlet partitioning")
def test_tiny_partitions_still_hold_one_test_sample():
    cfg = synthetic(num_samples=20, partitioner="dirichlet", alpha=0.5)
    for pid in range(10):
        train, test = D.load_partition(cfg, pid, 10)
        assert len(train) >= 1 and len(test) >= 1


# --------------------------------------------------------------------------- real data


def test_missing_cifar10_names_the_path(tmp_path):
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere") as err:
        D.load_partition(cfg, 0, 2)
    assert "cifar-10-batches-py" in str(err.value)
    (tmp_path / "cifar-10-batches-py").mkdir()  # the folder without its files
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        D.load_partition(DataConfig(name="cifar10", root=str(tmp_path)), 0, 2)
    with pytest.raises(FileNotFoundError, match="data.root"):
        D.load_partition(DataConfig(name="stl10", root=None), 0, 2)


def test_digits_load_as_ten_class_rgb_images():
    cfg = DataConfig(name="digits", image_size=16, num_samples=5000, partitioner="iid")
    assert D.num_classes(cfg) == 10
    sizes, labels = 0, set()
    for pid in range(3):
        train, test = D.load_partition(cfg, pid, 3)
        item = train[0]
        assert set(item) == {"image", "label"}
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert item["label"].dtype == torch.int64
        images = train.tensors["image"]
        assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.5
        assert torch.equal(images[:, 0], images[:, 2])  # grey repeated on 3 channels
        sizes += len(train) + len(test)
        labels |= set(train.tensors["label"].tolist())
    assert sizes == 1797  # all of scikit-learn's digits: num_samples is capped
    assert labels == set(range(10))


def test_num_classes_and_unknown_names():
    assert D.num_classes(synthetic()) == len(S.CLASSES) == 4
    with pytest.raises(ValueError, match="'mnist'"):
        D.num_classes(DataConfig(name="mnist"))


def test_real_images_are_scaled_and_resized(monkeypatch):
    """STL-10-like uint8 96x96 images come out as float [3,S,S] in [0,1]."""
    images = np.zeros((40, 3, 96, 96), dtype=np.uint8)
    images[:, 0] = 255  # pure red
    labels = np.arange(40) % 10
    monkeypatch.setattr(SRC, "_torchvision", lambda cfg: SRC._array_source(
        "stl10", "fake", images, labels, [str(c) for c in range(10)]))
    SRC._get_source.cache_clear()
    cfg = DataConfig(name="stl10", root="fake-stl10-for-resize-test", image_size=32,
                     num_samples=30, partitioner="iid")
    train, test = D.load_partition(cfg, 1, 3)
    assert len(train) + len(test) == 10  # 30 of the 40 images, a third each
    x = train.tensors["image"]
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], torch.ones(())) and torch.allclose(x[:, 1:], torch.zeros(()))
    assert set(train.tensors["label"].tolist()) <= set(range(10))


# --------------------------------------------------------------------------- textures, depth


def _webp_bytes(images: torch.Tensor, quality: int = 75) -> float:
    """Mean WebP file size of the images (Pillow, method 6)."""
    import io

    from PIL import Image
    sizes = []
    for img in images:
        buf = io.BytesIO()
        pixels = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(buf, "WEBP", quality=quality, method=6)
        sizes.append(len(buf.getvalue()))
    return float(np.mean(sizes))


def test_textured_scenes_change_pixels_only(scenes):
    textured = S.SyntheticScenes(synthetic(texture="textured"), range(300))
    for key in scenes.tensors:
        if key != "image":
            assert torch.equal(textured.tensors[key], scenes.tensors[key]), key
    flat_img, tex_img = scenes.tensors["image"], textured.tensors["image"]
    assert not torch.equal(flat_img, tex_img)
    assert tex_img.min() >= 0 and tex_img.max() <= 1
    # Detail an image codec must pay for (measured: 414 against 253 B per 32x32 image).
    assert _webp_bytes(tex_img[:40]) > 1.4 * _webp_bytes(flat_img[:40])
    # Each object keeps its named colour: its mean pixel is nearest to that colour.
    names = list(S.COLORS)
    table = torch.tensor([S.COLORS[c] for c in names])
    for i in range(0, 300, 7):
        for k, obj in enumerate(S.scene_spec(0, i, 4)):
            alone = S.render_scene([obj], SIZE, texture="textured", texture_seed=[0, i, 3])
            mask = torch.from_numpy(alone["segmentation"] > 0)
            mean = torch.from_numpy(alone["image"])[:, mask].mean(dim=1)
            assert names[int(((table - mean) ** 2).sum(1).argmin())] == obj.color


def test_depth_map_agrees_with_the_painted_occlusions(scenes):
    ys = (torch.arange(SIZE) + 0.5) / SIZE
    for i in range(0, 300, 3):
        item = scenes[i]
        seg, depth = item["segmentation"], item["depth"]
        ground = seg == 0
        expected_ground = S.GROUND_DEPTH[0] + (S.GROUND_DEPTH[1] - S.GROUND_DEPTH[0]) * ys
        assert torch.allclose(depth, torch.where(ground, expected_ground[:, None].expand_as(depth),
                                                 depth))
        spec = S.scene_spec(0, i, 4)
        nearest = torch.full((SIZE, SIZE), float("inf"))
        nearest_class = torch.zeros(SIZE, SIZE, dtype=torch.int64)
        for k, obj in enumerate(spec):
            covers = torch.from_numpy(S.render_scene([obj], SIZE)["segmentation"] > 0)
            d = S.object_depth(obj, k)
            closer = covers & (d < nearest)
            nearest[closer], nearest_class[closer] = d, obj.class_id + 1
        # What a pixel shows is the nearest object covering it, at that object's depth.
        assert torch.equal(seg, nearest_class)
        assert torch.allclose(depth[~ground], nearest[~ground])
        assert depth[~ground].max() < expected_ground.min()


def test_texture_is_refused_for_real_images():
    from common.config import ConfigError, config_from_dict
    with pytest.raises(ConfigError, match="data.texture"):
        config_from_dict({"data": {"name": "digits", "texture": "textured"}})
