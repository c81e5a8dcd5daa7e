"""Samples held as stacked tensors: the dataset type every data source returns."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class TensorDictDataset(Dataset):
    """Samples held as stacked tensors; item i is {key: tensor[i]}.

    Stacking once makes __getitem__ a few indexing operations, so DataLoader batches
    cost nothing next to the model.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], indices=None):
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all tensors need the same first dimension, got {lengths}")
        self.tensors = tensors
        if indices is not None:  # the examples' indices into their source (common/data)
            self.indices = indices

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}
