"""Datasets: each client's local (train, test) split of the configured source.

    scenes.py          the synthetic multi-task scenes (the embedded default)
    images.py          real image folders (CIFAR-10, STL-10) and scikit-learn's digits
    partition.py       clients' shares (Flower Datasets partitioners) and local splits
    tensor_dataset.py  the dataset type every source returns

A new source adds a module here and a branch in `load_partition` and `num_classes`;
new annotations of the synthetic scenes (depth maps, textures) touch scenes.py only.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch.utils.data import Dataset

from common.config import DataConfig
from common.data.images import real_images, real_labels
from common.data.partition import partition_indices, train_test_indices
from common.data.scenes import CLASSES, SyntheticScenes, synthetic_labels
from common.data.tensor_dataset import TensorDictDataset


def num_classes(cfg: DataConfig) -> int:
    """Size of the label space: 4 shapes for synthetic scenes, 10 for the others."""
    if cfg.name == "synthetic":
        return len(CLASSES)
    if cfg.name in ("cifar10", "stl10", "digits"):
        return 10
    raise ValueError(f"unknown data.name {cfg.name!r}: use synthetic, cifar10, stl10 or digits")


def load_partition(cfg: DataConfig, partition_id: int, num_partitions: int,
                   caption_len: int = 12) -> tuple[Dataset, Dataset]:
    """The client's local (train, test) datasets.

    Cached per process because a Flower client calls this on every message; the
    returned datasets are shared, so do not modify their tensors in place.
    """
    key = tuple(sorted(dataclasses.asdict(cfg).items()))
    return _load_partition(key, int(partition_id), int(num_partitions), int(caption_len))


@functools.lru_cache(maxsize=128)
def _load_partition(cfg_key: tuple, partition_id: int, num_partitions: int,
                    caption_len: int) -> tuple[Dataset, Dataset]:
    cfg = DataConfig(**dict(cfg_key))
    if cfg.name == "synthetic":
        labels = synthetic_labels(cfg)
    elif cfg.name in ("cifar10", "stl10", "digits"):
        labels = real_labels(cfg)
    else:
        raise ValueError(f"unknown data.name {cfg.name!r}: use synthetic, cifar10, stl10 "
                         "or digits")
    indices = partition_indices(labels, num_partitions, partition_id, cfg)
    train, test = train_test_indices(indices, cfg.test_fraction, cfg.seed, partition_id)
    if cfg.name == "synthetic":
        return (SyntheticScenes(cfg, train, caption_len),
                SyntheticScenes(cfg, test, caption_len))
    return tuple(
        TensorDictDataset({"image": real_images(cfg, part),
                           "label": torch.from_numpy(labels[part])})
        for part in (train, test))
