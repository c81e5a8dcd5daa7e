"""Real image datasets for classification and reconstruction: CIFAR-10 and STL-10 read
from a local folder (never downloaded unless `data.download` is set), and
scikit-learn's bundled digits."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.config import DataConfig

_REAL_FOLDERS = {"cifar10": "cifar-10-batches-py", "stl10": "stl10_binary"}

def _dataset_root(name: str, root: str | None, download: bool = False) -> Path:
    """The folder torchvision expects, with an error that says where to put the data."""
    folder = _REAL_FOLDERS[name]
    if root is None:
        raise FileNotFoundError(
            f"data.root is not set for {name}: set it to a folder holding the extracted "
            f"'{folder}' folder (nothing is downloaded)")
    path = Path(root).expanduser()
    if path.name == folder:  # the user pointed at the extracted folder itself
        path = path.parent
    if not download and not (path / folder).is_dir():
        raise FileNotFoundError(
            f"{name} not found: '{path / folder}' does not exist. Place the extracted "
            f"'{folder}' folder in '{path}' (nothing is downloaded unless you set "
            "data.download=true)")
    return path


@functools.lru_cache(maxsize=2)
def _real_arrays(name: str, root: str | None, download: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8 or float, channels first, NCHW) and labels of a real dataset.

    Cached because every client in a simulation process reads the same files.
    """
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()  # bundled with scikit-learn: 8x8, grey values 0..16
        return digits.images[:, None].astype(np.float32) / 16.0, digits.target.astype(np.int64)
    import torchvision

    path = _dataset_root(name, root, download)
    try:
        if name == "cifar10":
            ds = torchvision.datasets.CIFAR10(str(path), train=True, download=download)
            return ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets, dtype=np.int64)
        ds = torchvision.datasets.STL10(str(path), split="train", download=download)
        return ds.data, np.asarray(ds.labels, dtype=np.int64)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{name} files in '{path / _REAL_FOLDERS[name]}' are missing or corrupted "
            f"({err}). Place the complete extracted '{_REAL_FOLDERS[name]}' folder there "
            "(nothing is downloaded)") from err


def real_labels(cfg: DataConfig) -> np.ndarray:
    """Labels of the first `cfg.num_samples` images of a real dataset."""
    _, labels = _real_arrays(cfg.name, cfg.root, cfg.download)
    return labels[: cfg.num_samples].copy()


def real_images(cfg: DataConfig, indices: Sequence[int]) -> torch.Tensor:
    """Images `indices` as float32 [N,3,S,S] in [0,1], resized to cfg.image_size."""
    images, _ = _real_arrays(cfg.name, cfg.root, cfg.download)
    x = torch.from_numpy(np.ascontiguousarray(images[np.asarray(indices, dtype=np.int64)]))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    size = cfg.image_size
    if x.shape[-1] != size and len(x):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > size).clamp(0.0, 1.0)
    return x.contiguous()
