"""Datasets: each client's local (train, test) split of the configured source.

    scenes.py          the synthetic multi-task scenes (the embedded default)
    facts.py           the synthetic knowledge task: fact tables and knowledge questions
    sources.py         users' image folders and Hugging Face datasets, CIFAR-10 / STL-10
                       folders, scikit-learn's digits, scikit-image's photos
    text.py            the words of captions and questions, the VQA answer set
    partition.py       clients' shares (Flower Datasets partitioners) and local splits
    tensor_dataset.py  the dataset type every source returns

How a source's examples are laid out (DESIGN.md, the data flow). The synthetic scenes
are numbered: clients share scenes 0 .. num_samples-1, a workload's public split (what
the server pre-trains on) follows them, and a membership audit draws fresh scenes far
past both. A real source is finite, so its indices are put in one seeded order and the
same three ranges are cut from that order: the first num_samples (all of the source
when it has fewer) for the clients, the next `public_samples` for the public split, the
rest held out. Every dataset returned here keeps the source indices of its examples
(`.indices`), which a run records (fl_client/node.py) and the audit reads back.

A new source adds a loader in sources.py; new annotations of the synthetic scenes
(depth maps, textures) touch scenes.py only.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
from torch.utils.data import Dataset

from common.config import DataConfig
from common.data.facts import KNOWLEDGE_VOCAB, KnowledgeScenes
from common.data.partition import partition_indices, train_test_indices
from common.data.scenes import CLASSES, SyntheticScenes, synthetic_labels
from common.data.sources import DataError, Source, get_source
from common.data.tensor_dataset import TensorDictDataset
from common.data.text import SYNTHETIC_VOCAB, TextVocab

__all__ = ["DataError", "class_names", "client_pool", "examples", "held_out_pool",
           "load_partition", "mask_ids_are_labels", "num_classes", "prepare_partitions",
           "public_fingerprint", "public_indices", "public_split", "require",
           "seg_class_names", "seg_classes", "source_fingerprint", "source_keys",
           "source_order", "source_size", "text_vocab"]

SYNTHETIC_SEG_CLASSES = 1 + len(CLASSES)  # background + the four shapes
# What the synthetic scenes annotate besides the image.
SYNTHETIC_KEYS = frozenset({"label", "segmentation", "depth", "boxes", "num_objects",
                            "caption", "question", "answer"})


def _real(cfg: DataConfig) -> Source | None:
    return None if cfg.name == "synthetic" else get_source(cfg)


def source_size(cfg: DataConfig) -> int | None:
    """Examples in the source; None for the synthetic scenes (there is no end to them)."""
    src = _real(cfg)
    return None if src is None else src.size


def source_keys(cfg: DataConfig) -> frozenset[str]:
    """What the source annotates besides the image (label, segmentation, caption, ...)."""
    src = _real(cfg)
    return SYNTHETIC_KEYS if src is None else frozenset(src.keys)


def require(cfg: DataConfig, needs: dict[str, str]) -> None:
    """Fail when the source lacks an annotation a task needs ({key: task}), naming the
    task, the missing column and how to provide it."""
    src = _real(cfg)
    for key, task in needs.items():
        if src is not None:
            src.require(key, task, cfg)
        elif key not in SYNTHETIC_KEYS:
            raise DataError(f"task {task!r} needs {key!r}, which the synthetic scenes do not "
                            "annotate")


def num_classes(cfg: DataConfig) -> int:
    """Size of the label space: 4 shapes for synthetic scenes, else the source's classes."""
    if cfg.name == "synthetic":
        return len(CLASSES)
    src = get_source(cfg)
    if src.class_names is None:
        raise DataError(f"data.name={cfg.name!r} has no labels (no {cfg.label_column!r}): "
                        f"{src.how_to_add.get('label', 'use a labelled source')}")
    return len(src.class_names)


def class_names(cfg: DataConfig) -> tuple[str, ...]:
    if cfg.name == "synthetic":
        return CLASSES
    num_classes(cfg)  # the error when there are none
    return get_source(cfg).class_names


def seg_classes(cfg: DataConfig) -> int:
    """Segmentation classes, background (id 0) included."""
    if cfg.name == "synthetic":
        return SYNTHETIC_SEG_CLASSES
    src = get_source(cfg)
    if src.seg_classes is None:
        src.require("segmentation", "segmentation", cfg)
    return src.seg_classes


def seg_class_names(cfg: DataConfig) -> tuple[str, ...]:
    """The names of mask ids 1 .. seg_classes - 1: the shapes for the synthetic scenes,
    data.seg_class_names where given, else "class 1", "class 2", ... (a mask file does
    not say what its ids mean)."""
    if cfg.name == "synthetic":
        return CLASSES
    count = seg_classes(cfg)
    names = tuple(cfg.seg_class_names)
    if names and len(names) != count - 1:
        raise DataError(f"data.seg_class_names has {len(names)} names, the masks have "
                        f"{count - 1} object ids (1 .. {count - 1}): give one name per id")
    return names or tuple(f"class {k}" for k in range(1, count))


def mask_ids_are_labels(cfg: DataConfig) -> bool:
    """Whether mask id k is label k - 1: always for the synthetic scenes; for a real
    source when data.seg_class_names are its class names, in their order."""
    if cfg.name == "synthetic":
        return True
    return ("label" in source_keys(cfg) and "segmentation" in source_keys(cfg)
            and bool(cfg.seg_class_names) and seg_class_names(cfg) == class_names(cfg))


def text_vocab(cfg: DataConfig) -> TextVocab:
    """The vocabulary captions and questions are tokenised with, and the answer set."""
    if cfg.name != "synthetic":
        return get_source(cfg).vocab
    return KNOWLEDGE_VOCAB if cfg.questions == "knowledge" else SYNTHETIC_VOCAB


# --------------------------------------------------------------------------- layout

def source_order(cfg: DataConfig) -> np.ndarray:
    """The seeded order of a real source's indices (clients, public split, held out)."""
    return _source_order(get_source(cfg).size, cfg.seed).copy()


@functools.lru_cache(maxsize=8)
def _source_order(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0x5eed]).permutation(size)


def _pool_size(cfg: DataConfig) -> int:
    size = source_size(cfg)
    return cfg.num_samples if size is None else min(cfg.num_samples, size)


def client_pool(cfg: DataConfig) -> np.ndarray:
    """Source indices of the examples the clients share, in partitioning order."""
    if cfg.name == "synthetic":
        return np.arange(cfg.num_samples, dtype=np.int64)
    return source_order(cfg)[: _pool_size(cfg)]


def public_indices(cfg: DataConfig, size: int, key: str) -> np.ndarray:
    """Source indices of the public split of `size` examples (config key `key`): after the
    clients' examples, so no client owns one."""
    first = _pool_size(cfg)
    if cfg.name == "synthetic":
        return np.arange(first, first + size, dtype=np.int64)
    order = source_order(cfg)
    if first + size > len(order):
        raise DataError(
            f"data.name={cfg.name!r} has {len(order)} examples and data.num_samples="
            f"{cfg.num_samples} gives the clients {first}, which leaves {len(order) - first} "
            f"for the public split of {key}={size}: lower data.num_samples to "
            f"{max(len(order) - size, 0)} or less, or lower {key}")
    return order[first:first + size]


def held_out_pool(cfg: DataConfig, public_samples: int) -> np.ndarray:
    """Source indices no client and no public split holds (a real source's tail)."""
    if cfg.name == "synthetic":
        raise DataError("the synthetic scenes have no tail: draw held-out scenes with "
                        "scenes.held_out_indices")
    first = _pool_size(cfg) + public_samples
    return source_order(cfg)[first:]


def source_fingerprint(cfg: DataConfig) -> str:
    """What identifies the examples behind the indices: the scene generator's settings, or
    a real source's files, labels and columns."""
    if cfg.name == "synthetic":
        return f"synthetic seed={cfg.seed} max_objects={cfg.max_objects} texture={cfg.texture}"
    return f"{cfg.name} {get_source(cfg).fingerprint}"


def public_fingerprint(cfg: DataConfig) -> dict:
    """The data values that change the public split's examples (its size is each
    workload's own)."""
    out = {"seed": cfg.seed, "image_size": cfg.image_size, "public_first_index": cfg.num_samples}
    if cfg.name == "synthetic":  # as before real sources, so saved files stay valid
        return {**out, "max_objects": cfg.max_objects, "texture": cfg.texture}
    return {**out, "source": cfg.name, "source_fingerprint": get_source(cfg).fingerprint}


# --------------------------------------------------------------------------- datasets

def examples(cfg: DataConfig, indices, caption_len: int = 12) -> Dataset:
    """The examples `indices` of the source, with `.indices` set."""
    indices = np.asarray(indices, dtype=np.int64)
    if cfg.name == "synthetic":
        scenes = KnowledgeScenes if cfg.questions == "knowledge" else SyntheticScenes
        return scenes(cfg, indices, caption_len)
    return TensorDictDataset(get_source(cfg).examples(indices, cfg.image_size, caption_len),
                             indices)


def public_split(cfg: DataConfig, size: int, key: str, caption_len: int = 12) -> Dataset:
    """The public split (see `public_indices`) as a dataset."""
    return examples(cfg, public_indices(cfg, size, key), caption_len)


def load_partition(cfg: DataConfig, partition_id: int, num_partitions: int,
                   caption_len: int = 12, needs: dict[str, str] | None = None
                   ) -> tuple[Dataset, Dataset]:
    """The client's local (train, test) datasets.

    `needs` ({annotation: task}) fails first when the source lacks what a task needs.
    Cached per process because a Flower client calls this on every message; the
    returned datasets are shared, so do not modify their tensors in place.
    """
    if needs:
        require(cfg, needs)
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    return _load_partition(key, int(partition_id), int(num_partitions), int(caption_len))


@functools.lru_cache(maxsize=128)
def _load_partition(cfg_key: str, partition_id: int, num_partitions: int,
                    caption_len: int) -> tuple[Dataset, Dataset]:
    cfg = DataConfig(**json.loads(cfg_key))
    pool, positions = _partition_positions(cfg, num_partitions, partition_id)
    train, test = train_test_indices(positions, cfg.test_fraction, cfg.seed, partition_id)
    return examples(cfg, pool[train], caption_len), examples(cfg, pool[test], caption_len)


def _partition_positions(cfg: DataConfig, num_partitions: int, partition_id: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(the clients' pool of source indices, partition `partition_id`'s positions in it)."""
    pool = client_pool(cfg)
    if cfg.name == "synthetic":
        split_by = synthetic_labels(cfg)
    else:
        src = get_source(cfg)
        split_by = _split_by(cfg, src)[pool]
    return pool, partition_indices(split_by, num_partitions, partition_id, cfg)


def prepare_partitions(cfg: DataConfig, num_partitions: int) -> None:
    """Fill this process's caches for `load_partition` with `num_partitions`: the source's
    order and labels and the partition table (the Flower Datasets partitioner's run),
    without reading or rendering any example. A simulation's client actors call it when
    they start (simulation/warm.py)."""
    _partition_positions(cfg, num_partitions, 0)


def _split_by(cfg: DataConfig, src: Source) -> np.ndarray:
    """What the partitioner splits a real source by: owners, labels, or (IID on an
    unlabelled source) nothing."""
    if cfg.partitioner == "natural_id":
        if src.natural_ids is None:
            raise DataError(f"data.partitioner=natural_id: data.name={cfg.name!r} does not "
                            "name each example's owner; set data.natural_id_column (hf) or "
                            "use another partitioner")
        return src.natural_ids
    if src.labels is not None:
        return src.labels
    if cfg.partitioner != "iid":
        raise DataError(f"data.partitioner={cfg.partitioner!r} splits by label and "
                        f"data.name={cfg.name!r} has none: use data.partitioner=iid, or "
                        f"{src.how_to_add.get('label', 'a labelled source')}")
    return np.zeros(src.size, dtype=np.int64)
