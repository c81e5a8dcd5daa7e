"""Partitioning: each client's share of a dataset through Flower Datasets partitioners
(IID, Dirichlet or pathological label skew, shards of sorted labels, or the data's own
owners: natural id), and its split into a local train and test set."""

from __future__ import annotations

import functools
import warnings

import numpy as np

from common.config import DataConfig


def _min_partition_size(num_samples: int, num_partitions: int) -> int:
    """Ask for 2..10 samples per partition: enough for a train and a test sample.

    Larger minimums make Dirichlet draws fail on 100 clients of a 4-class dataset.
    """
    wanted = min(10, max(2, num_samples // (10 * num_partitions)))
    return max(1, min(wanted, num_samples // num_partitions))


def _top_up(parts: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Move samples from the largest partitions to those below `min_size`."""
    parts = [p.copy() for p in parts]
    for i in range(len(parts)):
        while len(parts[i]) < min_size:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            parts[i] = np.append(parts[i], parts[donor][-1])
            parts[donor] = parts[donor][:-1]
    return parts


PARTITIONERS = ("iid", "dirichlet", "pathological", "shard", "natural_id")


@functools.lru_cache(maxsize=16)
def _partition_table(label_bytes: bytes, num_partitions: int, partitioner: str,
                     alpha: float, seed: int, classes_per_partition: int = 2,
                     shards_per_partition: int = 2) -> tuple[np.ndarray, ...]:
    """Sample indices of every partition, from a Flower Datasets partitioner.

    `label_bytes` holds what the partitioner splits by: the labels, or for natural_id
    each example's owner. Cached: all clients of a process share one assignment and it
    is computed once.
    """
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
    )

    labels = np.frombuffer(label_bytes, dtype=np.int64)
    order = np.arange(len(labels))
    if partitioner == "iid":  # IidPartitioner cuts contiguous shards: shuffle first
        order = np.random.default_rng(seed).permutation(order)
    table = datasets.Dataset.from_dict({"label": labels[order], "index": order})
    min_size = _min_partition_size(len(labels), num_partitions)

    def run(part) -> list[np.ndarray]:
        part.dataset = table
        return [np.asarray(part.load_partition(pid)["index"], dtype=np.int64)
                for pid in range(num_partitions)]

    if partitioner == "iid":
        return tuple(run(IidPartitioner(num_partitions=num_partitions)))
    if partitioner == "natural_id":
        owners = len(np.unique(labels))
        if owners != num_partitions:
            raise ValueError(f"data.partitioner=natural_id gives one partition per owner: "
                             f"the source has {owners} owners, so set num_clients={owners} "
                             f"(it is {num_partitions})")
        return tuple(run(NaturalIdPartitioner(partition_by="label")))  # p: the p-th owner
    if partitioner == "pathological":
        classes = len(np.unique(labels))
        if not 1 <= classes_per_partition <= classes:
            raise ValueError(f"data.classes_per_partition={classes_per_partition} is out of "
                             f"range: use 1 .. {classes} (the classes in the data)")
        make = lambda: PathologicalPartitioner(  # noqa: E731
            num_partitions=num_partitions, partition_by="label",
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode="first-deterministic", seed=seed)
    elif partitioner == "shard":
        if num_partitions * shards_per_partition > len(labels):
            raise ValueError(f"data.shards_per_partition={shards_per_partition} x "
                             f"{num_partitions} partitions is more shards than the "
                             f"{len(labels)} samples: lower it or raise data.num_samples")
        make = lambda: ShardPartitioner(  # noqa: E731
            num_partitions=num_partitions, partition_by="label",
            num_shards_per_partition=shards_per_partition, seed=seed)
    elif partitioner == "dirichlet":
        make = None
    else:
        raise ValueError(f"unknown data.partitioner {partitioner!r}: use one of "
                         f"{', '.join(PARTITIONERS)}")
    if make is not None:  # label skew by construction: top up partitions it left small
        parts = run(make())
        if min(len(p) for p in parts) >= min_size:
            return tuple(parts)
        return _topped_up(parts, min_size, f"{partitioner} partitioning",
                          "Raise data.num_samples or lower num_clients")

    def dirichlet(min_partition_size: int) -> DirichletPartitioner:
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha,
            min_partition_size=min_partition_size, self_balancing=True, seed=seed)

    with warnings.catch_warnings():  # it warns on every failed draw before retrying
        warnings.simplefilter("ignore", UserWarning)
        try:
            return tuple(run(dirichlet(min_size)))
        except ValueError:  # 11 draws left a partition too small
            parts = run(dirichlet(0))
    return _topped_up(parts, min_size, f"Dirichlet partitioning (alpha={alpha})",
                      "Raise data.alpha or data.num_samples, or lower num_clients,")


def _topped_up(parts: list[np.ndarray], min_size: int, what: str, fix: str
               ) -> tuple[np.ndarray, ...]:
    """`parts` with samples moved to those below `min_size`, and a warning that says so."""
    warnings.warn(
        f"{what} of {sum(len(p) for p in parts)} samples into {len(parts)} partitions left "
        f"some with fewer than {min_size} samples; moved samples there from the largest "
        f"partitions. {fix} to avoid this.", stacklevel=4)
    return tuple(_top_up(parts, min_size))


def partition_indices(labels: np.ndarray, num_partitions: int, partition_id: int,
                      cfg: DataConfig) -> np.ndarray:
    """Indices (into `labels`) of the samples in partition `partition_id`.

    Partitions are disjoint and never empty; they cover every sample except for
    pathological partitions of fewer class slots (partitions x classes_per_partition)
    than classes, which leave the classes no partition draws out. Dirichlet
    partitions split each label among the partitions with concentration cfg.alpha;
    for natural_id, `labels` holds each sample's owner.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not isinstance(num_partitions, (int, np.integer)) or not 1 <= num_partitions <= len(labels):
        raise ValueError(f"num_partitions={num_partitions!r} is invalid: use 1..{len(labels)} "
                         f"(the number of samples), or raise data.num_samples")
    if not isinstance(partition_id, (int, np.integer)) or not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id={partition_id!r} is out of range: use "
                         f"0..{num_partitions - 1} for num_partitions={num_partitions}")
    table = _partition_table(labels.tobytes(), int(num_partitions), cfg.partitioner,
                             float(cfg.alpha), int(cfg.seed), int(cfg.classes_per_partition),
                             int(cfg.shards_per_partition))
    return table[partition_id].copy()


def train_test_indices(indices: np.ndarray, test_fraction: float, seed: int, partition_id: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffle, then the last `test_fraction` share (at least 1) is the test set."""
    if len(indices) < 2:
        raise ValueError(f"partition {partition_id} has {len(indices)} sample(s), too few "
                         "for a train and a test set: raise data.num_samples or lower "
                         "num_clients")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction!r} is invalid: use 0 < x < 1")
    shuffled = np.random.default_rng([seed, partition_id]).permutation(indices)
    n_test = min(max(1, round(len(shuffled) * test_fraction)), len(shuffled) - 1)
    return shuffled[:-n_test], shuffled[-n_test:]
