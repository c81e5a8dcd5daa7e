"""Users' own data and the real datasets: one loader per source, one `Source` type.

    folder   a local image folder, one sub-folder per class (torchvision's ImageFolder
             lists it); optional `metadata.jsonl` beside the class folders (the
             `imagefolder` convention: a `file_name` relative to the folder, plus
             caption / question / answer fields) and an optional masks folder that
             mirrors the image folder (one PNG of class ids per image, same stem)
    hf       any Hugging Face dataset through Flower Datasets' FederatedDataset:
             `imagefolder`, `parquet`, `csv`, `json` with a local data_dir / data_files
             work offline; a hub name needs the network and `data.allow_hub`
    cifar10, stl10   local folders of the extracted archives (torchvision reads them)
    digits   scikit-learn's bundled 8x8 digits
    photos   the colour photographs in scikit-image's wheel, cut into patches

A Source holds what is cheap to hold for every example (labels, natural ids, texts)
and decodes images and masks only for the indices asked for, so a client reads only
its own share. Images come out as float32 [N,3,S,S] in [0,1]: the shorter side resized
to S (antialiased when shrinking), then the centre S x S; masks the same with nearest
neighbours. A client's datasets keep the source indices of their examples (`indices`),
which is what a run records and an audit reads back.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.config import ConfigError, DataConfig
from common.data.text import TextVocab, build_vocab, words

# Texts a source may carry per example, by the config key that names their column.
TEXT_KEYS = ("caption", "question", "answer")
# Builders of `datasets` that read local files: no network needed.
LOCAL_HF_BUILDERS = ("imagefolder", "parquet", "csv", "json", "arrow", "text")


class DataError(ConfigError):
    """The data source cannot give what was asked; the message names the value and fix."""


@dataclasses.dataclass(eq=False)
class Source:
    """Every example of one data source, indexed 0 .. size-1 in the source's own order."""

    name: str
    size: int
    fingerprint: str  # changes when the examples do: files, labels, columns
    labels: np.ndarray | None  # int64 [size], None for an unlabelled source
    class_names: tuple[str, ...] | None
    natural_ids: np.ndarray | None  # int64 [size]: who owns each example, where known
    texts: dict[str, list[str]]  # "caption" / "question" / "answer" -> one text each
    seg_classes: int | None  # None: the source has no masks
    read_images: Callable[[np.ndarray], list[torch.Tensor]]  # indices -> [3,H,W] floats
    read_masks: Callable[[np.ndarray], list[torch.Tensor]] | None  # -> [H,W] int64
    how_to_add: dict[str, str]  # key -> how a user of this source provides it

    @property
    def keys(self) -> set[str]:
        """What the source annotates besides the image."""
        out = set(self.texts)
        if self.labels is not None:
            out.add("label")
        if self.read_masks is not None:
            out.add("segmentation")
        return out

    @functools.cached_property
    def vocab(self) -> TextVocab:
        return build_vocab(self.texts.get("caption", ()), self.texts.get("question", ()),
                           self.texts.get("answer", ()))

    def require(self, key: str, task: str, cfg: DataConfig) -> None:
        """Fail with what to do when a task needs an annotation the source lacks."""
        if key in self.keys:
            return
        column = {"label": cfg.label_column, "segmentation": cfg.mask_column,
                  "caption": cfg.caption_column, "question": cfg.question_column,
                  "answer": cfg.answer_column}[key]
        raise DataError(
            f"task {task!r} needs {key} ({column!r}), which data.name={self.name!r} does "
            f"not have: {self.how_to_add.get(key, 'use a source that has it')}, or turn "
            f"the task off")

    def examples(self, indices: Sequence[int], image_size: int, caption_len: int = 12
                 ) -> dict[str, torch.Tensor]:
        """The tensors of examples `indices`: the image and what the source annotates."""
        idx = np.asarray(indices, dtype=np.int64)
        out = {"image": _stack([fit(x[None], image_size)[0] for x in self.read_images(idx)],
                               (3, image_size, image_size), torch.float32)}
        if self.labels is not None:
            out["label"] = torch.from_numpy(self.labels[idx].copy())
        if self.read_masks is not None:
            masks = self.read_masks(idx)
            for i, m in zip(idx, masks):
                if m.numel() and (m.min() < 0 or m.max() >= self.seg_classes):
                    raise DataError(
                        f"the mask of example {i} of data.name={self.name!r} holds id "
                        f"{int(m.max())}, outside 0 .. {self.seg_classes - 1}: raise "
                        "data.seg_classes, or map the ids (e.g. a 255 'void' id) in the masks")
            out["segmentation"] = _stack(
                [fit(m[None, None].float(), image_size, nearest=True)[0, 0].long()
                 for m in masks], (image_size, image_size), torch.int64)
        vocab = self.vocab if self.texts else None
        if "caption" in self.texts:
            out["caption"] = _tokens([self.texts["caption"][i] for i in idx], vocab, caption_len)
        if "question" in self.texts:
            out["question"] = _tokens([self.texts["question"][i] for i in idx], vocab,
                                      vocab.question_len)
        if "answer" in self.texts:
            answer_ids = {a: i for i, a in enumerate(vocab.answers)}
            out["answer"] = torch.tensor(
                [answer_ids[" ".join(words(self.texts["answer"][i]))] for i in idx],
                dtype=torch.int64)
        return out


def _stack(items: list[torch.Tensor], shape: tuple[int, ...], dtype) -> torch.Tensor:
    return torch.stack(items) if items else torch.zeros((0, *shape), dtype=dtype)


def _tokens(texts: list[str], vocab: TextVocab, length: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([vocab.encode(t, length) for t in texts])
                            if texts else np.zeros((0, length), dtype=np.int64))


def fit(x: torch.Tensor, size: int, nearest: bool = False) -> torch.Tensor:
    """[N,C,H,W] with the shorter side resized to `size`, then the centre size x size."""
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
        if nearest:
            x = F.interpolate(x, size=new, mode="nearest-exact")
        else:
            x = F.interpolate(x, size=new, mode="bilinear", align_corners=False,
                              antialias=scale < 1).clamp(0.0, 1.0)
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    return x.contiguous()


def _as_image(array: np.ndarray) -> torch.Tensor:
    """HWC or HW uint8 / float array -> [3,H,W] float32 in [0,1]."""
    x = torch.from_numpy(np.array(array))  # a copy: PIL's arrays are read-only
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.ndim == 2:
        x = x[None]
    else:
        x = x.permute(2, 0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x[:3].contiguous()


def _pil_image(img) -> torch.Tensor:
    return _as_image(np.asarray(img.convert("RGB")))


def _pil_mask(img) -> torch.Tensor:
    mask = np.asarray(img)
    if mask.ndim == 3:  # an RGB(A) PNG of class ids: they are in the first channel
        mask = mask[..., 0]
    return torch.from_numpy(mask.astype(np.int64))


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_key(cfg: DataConfig) -> tuple:
    """The config values that choose a source's examples (not their size or split)."""
    keys = ("name", "root", "download", "hf_dataset", "data_files", "hf_split", "hf_subset",
            "allow_hub", "masks_root", "image_column", "label_column", "mask_column",
            "caption_column", "question_column", "answer_column", "natural_id_column",
            "seg_classes", "seg_class_names")
    return tuple((k, json.dumps(getattr(cfg, k))) for k in keys)


def get_source(cfg: DataConfig) -> Source:
    """The source `cfg` names (not the synthetic scenes), read once per process."""
    return _get_source(source_key(cfg))


@functools.lru_cache(maxsize=4)
def _get_source(key: tuple) -> Source:
    cfg = DataConfig(**{k: json.loads(v) for k, v in key})
    loaders = {"folder": _folder, "hf": _hf, "cifar10": _torchvision, "stl10": _torchvision,
               "digits": _digits, "photos": _photos}
    if cfg.name not in loaders:
        raise DataError(f"data.name={cfg.name!r} is not a real source: use one of "
                        f"{', '.join(loaders)} (or synthetic)")
    src = loaders[cfg.name](cfg)
    if src.size < 2:
        raise DataError(f"data.name={cfg.name!r} has {src.size} example(s): a source needs "
                        "at least 2 (a train and a test example)")
    return src


def _seg_classes(cfg: DataConfig, masks: Callable, size: int) -> int:
    """data.seg_classes, else the largest class id in every mask + 1 (read once)."""
    if cfg.seg_classes is not None:
        return cfg.seg_classes
    top = 0
    for start in range(0, size, 256):
        top = max([top, *(int(m.max()) for m in masks(np.arange(start, min(size, start + 256))))])
    return top + 1


# --------------------------------------------------------------------------- folder

def _folder(cfg: DataConfig) -> Source:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    if cfg.root is None:
        raise DataError("data.root is not set for data.name='folder': set it to an image "
                        "folder with one sub-folder per class")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={cfg.root!r} is not a folder: give an image folder with "
                        "one sub-folder per class")
    try:
        listing = ImageFolder(str(root), allow_empty=False)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"data.root={cfg.root!r}: {err}. Put the images in one sub-folder "
                        "per class (e.g. root/cat/001.png)") from err
    files = [Path(p) for p, _ in listing.samples]
    rel = [f.relative_to(root).as_posix() for f in files]
    labels = np.asarray([c for _, c in listing.samples], dtype=np.int64)
    texts = _folder_texts(cfg, root, rel)
    read_masks, seg_classes = None, None
    mask_files: list[Path] = []
    if cfg.masks_root is not None:
        masks_root = Path(cfg.masks_root).expanduser()
        mask_files = [masks_root / Path(r).with_suffix(".png") for r in rel]
        missing = [str(m) for m in mask_files if not m.is_file()]
        if missing:
            raise DataError(f"data.masks_root={cfg.masks_root!r} lacks {len(missing)} of "
                            f"{len(rel)} masks, e.g. {missing[0]}: give one PNG per image, "
                            "at the image's path with a .png suffix")

        def read_masks(idx):
            return [_pil_mask(Image.open(mask_files[i])) for i in idx]

        seg_classes = _seg_classes(cfg, read_masks, len(files))

    def read_images(idx):
        return [_pil_image(Image.open(files[i])) for i in idx]

    def stat(f: Path) -> tuple[int, int]:
        return os.path.getsize(f), int(os.path.getmtime(f))

    stats = [(r, *stat(f)) for r, f in zip(rel, files)]
    return Source(
        "folder", len(files), _hash(stats, [(str(m), *stat(m)) for m in mask_files], texts),
        labels, tuple(listing.classes), None, texts, seg_classes, read_images,
        read_masks, {
            "segmentation": "set data.masks_root to a folder of PNG masks mirroring "
                            "data.root",
            **{k: f"add a {k!r} field to every line of {root / 'metadata.jsonl'} (with "
                  "file_name, as the imagefolder layout has it)" for k in TEXT_KEYS}})


def _folder_texts(cfg: DataConfig, root: Path, rel: list[str]) -> dict[str, list[str]]:
    """Texts from root/metadata.jsonl, keyed by file_name; a field is kept when every
    image has it."""
    path = root / "metadata.jsonl"
    if not path.is_file():
        return {}
    by_file: dict[str, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            by_file[Path(row["file_name"]).as_posix()] = row
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path} line {n}: not a JSON object with a 'file_name' "
                            f"({err})") from err
    columns = {"caption": cfg.caption_column, "question": cfg.question_column,
               "answer": cfg.answer_column}
    texts = {}
    for key, column in columns.items():
        values = [by_file.get(r, {}).get(column) for r in rel]
        if all(v is not None for v in values):
            texts[key] = [str(v) for v in values]
        elif any(v is not None for v in values):
            lacking = next(r for r, v in zip(rel, values) if v is None)
            raise DataError(f"{path}: {column!r} is given for some images but not for "
                            f"{lacking!r}: give it for every image or for none")
    return texts


# --------------------------------------------------------------------------- hf

def _hf(cfg: DataConfig) -> Source:
    import datasets
    from flwr_datasets import FederatedDataset

    if cfg.hf_dataset is None:
        raise DataError("data.hf_dataset is not set for data.name='hf': name a builder "
                        f"({', '.join(LOCAL_HF_BUILDERS)}) with data.root or data.data_files, "
                        "or a hub dataset with data.allow_hub=true")
    local = cfg.hf_dataset in LOCAL_HF_BUILDERS or Path(cfg.hf_dataset).expanduser().exists()
    if not local and not cfg.allow_hub:
        raise DataError(f"data.hf_dataset={cfg.hf_dataset!r} is a hub dataset and needs the "
                        "network: set data.allow_hub=true, or save it locally and use "
                        "parquet / imagefolder with data.data_files / data.root")
    kwargs = {}
    if cfg.root is not None:
        kwargs["data_dir"] = str(Path(cfg.root).expanduser())
    if cfg.data_files:
        kwargs["data_files"] = [str(Path(f).expanduser()) for f in cfg.data_files]
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline or not cfg.allow_hub
    try:
        fds = FederatedDataset(dataset=cfg.hf_dataset, subset=cfg.hf_subset,
                               partitioners={cfg.hf_split: 1}, shuffle=False, **kwargs)
        ds = fds.load_split(cfg.hf_split)
    except (FileNotFoundError, ValueError, ConnectionError, KeyError) as err:
        raise DataError(f"data.hf_dataset={cfg.hf_dataset!r} (split {cfg.hf_split!r}) could "
                        f"not be loaded: {err}") from err
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    columns = set(ds.column_names)
    if cfg.image_column not in columns:
        raise DataError(f"data.image_column={cfg.image_column!r} is not a column of "
                        f"{cfg.hf_dataset!r}: its columns are {sorted(columns)}")
    labels = class_names = None
    if cfg.label_column in columns:
        feature = ds.features[cfg.label_column]
        if isinstance(feature, datasets.ClassLabel):
            class_names = tuple(feature.names)
            labels = np.asarray(ds[cfg.label_column], dtype=np.int64)
        else:
            values = ds[cfg.label_column]
            if all(isinstance(v, (int, np.integer)) for v in values):
                labels = np.asarray(values, dtype=np.int64)
                if labels.min() < 0:
                    raise DataError(f"data.label_column={cfg.label_column!r} holds negative "
                                    "labels: give class ids 0 .. K-1")
                class_names = tuple(str(i) for i in range(int(labels.max()) + 1))
            else:  # class names as strings: ids in sorted order, as ImageFolder does
                class_names = tuple(sorted({str(v) for v in values}))
                lookup = {c: i for i, c in enumerate(class_names)}
                labels = np.asarray([lookup[str(v)] for v in values], dtype=np.int64)
    natural_ids = None
    if cfg.natural_id_column is not None:
        if cfg.natural_id_column not in columns:
            raise DataError(f"data.natural_id_column={cfg.natural_id_column!r} is not a "
                            f"column of {cfg.hf_dataset!r}: its columns are {sorted(columns)}")
        natural_ids = np.unique(np.asarray([str(v) for v in ds[cfg.natural_id_column]]),
                                return_inverse=True)[1].astype(np.int64)
    texts = {key: [str(v) for v in ds[column]] for key, column in
             (("caption", cfg.caption_column), ("question", cfg.question_column),
              ("answer", cfg.answer_column)) if column in columns}
    image_ds = ds.select_columns([cfg.image_column])

    def read_images(idx):
        return [_hf_image(v) for v in image_ds.select(idx.tolist())[cfg.image_column]] \
            if len(idx) else []

    read_masks = seg_classes = None
    if cfg.mask_column in columns:
        mask_ds = ds.select_columns([cfg.mask_column])

        def read_masks(idx):
            return [_hf_mask(v) for v in mask_ds.select(idx.tolist())[cfg.mask_column]] \
                if len(idx) else []

        seg_classes = _seg_classes(cfg, read_masks, len(ds))
    hint = (f"add a column and name it with data.{{key}}_column (the columns are "
            f"{sorted(columns)})")
    return Source(
        "hf", len(ds), _hash(ds._fingerprint, cfg.hf_dataset, sorted(columns)), labels,
        class_names, natural_ids, texts, seg_classes, read_images, read_masks,
        {k: hint.format(key={"segmentation": "mask"}.get(k, k))
         for k in ("label", "segmentation", *TEXT_KEYS)})


def _hf_image(value) -> torch.Tensor:
    if hasattr(value, "convert"):  # a PIL image (datasets' Image feature)
        return _pil_image(value)
    return _as_image(np.asarray(value))


def _hf_mask(value) -> torch.Tensor:
    if hasattr(value, "convert"):
        return _pil_mask(value)
    return torch.from_numpy(np.asarray(value, dtype=np.int64))


# --------------------------------------------------------------------------- arrays

def _array_source(name: str, fingerprint: str, images: np.ndarray, labels: np.ndarray,
                  class_names: Sequence[str], natural_ids: np.ndarray | None = None) -> Source:
    """A source held as one NCHW (or NHWC for photos) array in memory."""
    def read_images(idx):
        return [_as_image(images[i].transpose(1, 2, 0)) for i in idx]

    return Source(name, len(images), fingerprint, labels.astype(np.int64), tuple(class_names),
                  natural_ids, {}, None, read_images, None,
                  {"segmentation": "use data.name=folder (masks_root) or hf (mask_column)",
                   **{k: "use data.name=folder (metadata.jsonl) or hf" for k in TEXT_KEYS}})


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


def _torchvision(cfg: DataConfig) -> Source:
    import torchvision

    name = cfg.name
    path = _dataset_root(name, cfg.root, cfg.download)
    try:
        if name == "cifar10":
            ds = torchvision.datasets.CIFAR10(str(path), train=True, download=cfg.download)
            images, labels = ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets)
        else:
            ds = torchvision.datasets.STL10(str(path), split="train", download=cfg.download)
            images, labels = ds.data, np.asarray(ds.labels)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{name} files in '{path / _REAL_FOLDERS[name]}' are missing or corrupted "
            f"({err}). Place the complete extracted '{_REAL_FOLDERS[name]}' folder there "
            "(nothing is downloaded)") from err
    return _array_source(name, _hash(name, len(images), labels.tolist()), images, labels,
                         ds.classes)


def _digits(cfg: DataConfig) -> Source:
    from sklearn.datasets import load_digits

    digits = load_digits()  # bundled with scikit-learn: 8x8, grey values 0..16
    images = digits.images[:, None].astype(np.float32) / 16.0
    return _array_source("digits", _hash("digits", len(images)), images, digits.target,
                         [str(d) for d in range(10)])


# The colour photographs in scikit-image's wheel (no download), and the scene each shows:
# the stereo pair is one scene seen twice, so its two photos share a label.
PHOTOS = (("astronaut", "astronaut"), ("coffee", "coffee"), ("chelsea", "chelsea"),
          ("rocket", "rocket"), ("hubble_deep_field", "hubble_deep_field"),
          ("retina", "retina"), ("immunohistochemistry", "immunohistochemistry"),
          ("stereo_motorcycle_left", "motorcycle"), ("stereo_motorcycle_right", "motorcycle"))
PHOTO_PATCH = 64  # patch side in the photo's pixels after scaling (then resized to S)
PHOTO_SHORT_SIDE = 512  # every photo is scaled so that its shorter side is this


def _photo(name: str) -> np.ndarray:
    from skimage import data

    if name.startswith("stereo_motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(data, name)()


@functools.lru_cache(maxsize=1)
def photo_patches() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patches uint8 [N,3,P,P], scene label [N], photo id [N]): every photo scaled to a
    shorter side of PHOTO_SHORT_SIDE and cut into non-overlapping PHOTO_PATCH squares,
    row by row (the same patches on every machine)."""
    scenes = list(dict.fromkeys(scene for _, scene in PHOTOS))
    patches, labels, ids = [], [], []
    for photo_id, (name, scene) in enumerate(PHOTOS):
        x = torch.from_numpy(_photo(name)).permute(2, 0, 1)[None].float() / 255.0
        h, w = x.shape[-2:]
        scale = PHOTO_SHORT_SIDE / min(h, w)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear",
                          align_corners=False, antialias=scale < 1).clamp(0, 1)
        x = (x[0] * 255).round().to(torch.uint8).numpy()
        p = PHOTO_PATCH
        for top in range(0, x.shape[1] - p + 1, p):
            for left in range(0, x.shape[2] - p + 1, p):
                patches.append(x[:, top:top + p, left:left + p])
                labels.append(scenes.index(scene))
                ids.append(photo_id)
    return np.stack(patches), np.asarray(labels, np.int64), np.asarray(ids, np.int64)


def _photos(cfg: DataConfig) -> Source:
    patches, labels, ids = photo_patches()
    scenes = tuple(dict.fromkeys(scene for _, scene in PHOTOS))
    return _array_source("photos", _hash("photos", PHOTO_SHORT_SIDE, PHOTO_PATCH, len(patches)),
                         patches, labels, scenes, ids)
