"""Seeded blocks: every party builds the same weights from the same seed."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block under a fixed torch seed without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of one client's local round (batch order, channel draws): the same
    whether the round runs federated, split over messages or in one process."""
    return seed * 100_003 + server_round * 1009 + partition_id
