"""The synthetic multi-task scenes: the embedded default dataset.

Coloured shapes on a dark background, with a class label, a segmentation map, boxes, a
depth map, a caption and a VQA pair per image. `texture="textured"` paints a smooth
coloured background with grain and striped objects instead of flat colours, so that an
image codec must pay for detail; it changes pixels only, never an annotation. They need no download, every sample is a pure
function of (seed, index), so each Flower client renders only its own samples, and
every answer is true by construction, which makes task metrics meaningful even for tiny
models.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import numpy as np
import torch

from common.config import DataConfig
from common.data.tensor_dataset import TensorDictDataset

# --------------------------------------------------------------------------- vocabulary

CLASSES = ("circle", "square", "triangle", "cross")
"""Object classes. Segmentation ids: 0 = background, class index + 1 for an object."""

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.20, 0.80, 0.25),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.90, 0.20),
    "purple": (0.65, 0.25, 0.85),
    "white": (0.95, 0.95, 0.95),
}
BACKGROUND = (0.05, 0.05, 0.07)
NOISE_STD = 0.02  # pixel noise: keeps images from being piecewise constant

MAX_OBJECTS = 4  # the most objects a scene can hold (config allows 1..4)
COUNT_WORDS = ("one", "two", "three", "four")

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
_CAPTION_WORDS = ("a", "and", "big", "small", *COLORS, *CLASSES)
_QUESTION_WORDS = ("what", "color", "is", "the", "largest", "shape", "object",
                   "how", "many", "objects", "are", "there")
ANSWERS: tuple[str, ...] = (*COLORS, *CLASSES, *COUNT_WORDS, "yes", "no")
"""The closed VQA answer set; an item's "answer" is an index into it."""

VOCAB: tuple[str, ...] = _SPECIAL_TOKENS + tuple(
    dict.fromkeys(_CAPTION_WORDS + _QUESTION_WORDS + ANSWERS)
)
WORD_TO_ID = {word: i for i, word in enumerate(VOCAB)}
QUESTION_LEN = 8  # BOS + the longest question (6 words) + EOS

# --------------------------------------------------------------------------- scene specs

# Shapes are sized by their area so that "largest" means what one sees and, since every
# shape draws its area from the same range, the four labels are equally likely.
# AREA_FACTOR[c] * half_extent**2 is the area of class c (image side = 1).
_CROSS_ARM = 0.35  # half-thickness of a cross arm, relative to the half-extent
AREA_FACTOR = (
    math.pi,  # circle of radius r
    4.0,  # square of half-side r
    2.0,  # triangle, apex up, base 2r, height 2r
    8 * _CROSS_ARM - 4 * _CROSS_ARM**2,  # two 2r x 2t bars minus their overlap
)
SIDE_RANGE = (0.18, 0.40)  # sqrt(area) of an object, in image sides
BIG_SIDE = 0.29  # objects at least this big are called "big" in captions
# Every object's centre stays outside every other object's bounding box (by this
# margin, more than half a pixel at image_size >= 16), so no object is ever hidden and
# the counts and yes/no answers stay true after painting.
_CENTRE_MARGIN = 0.04
_MIN_IMAGE_SIZE = 16


class SceneObject(NamedTuple):
    class_id: int  # index into CLASSES
    color: str  # key of COLORS
    center: tuple[float, float]  # (x, y) in [0, 1], x to the right, y down
    size: float  # half-extent: the object lies within center +- size

    @property
    def area(self) -> float:
        return AREA_FACTOR[self.class_id] * self.size**2

    @property
    def box(self) -> tuple[float, float, float, float]:
        (x, y), r = self.center, self.size
        return (x - r, y - r, x + r, y + r)


def _place(rng: np.random.Generator, size: float, placed: list[SceneObject]
           ) -> tuple[float, float] | None:
    """A centre that keeps this object and the placed ones mutually unhidden."""
    for _ in range(50):
        x, y = rng.uniform(size, 1.0 - size, size=2)
        if all(max(abs(x - o.center[0]), abs(y - o.center[1])) > max(size, o.size)
               + _CENTRE_MARGIN for o in placed):
            return float(x), float(y)
    return None


def scene_spec(seed: int, index: int, max_objects: int) -> list[SceneObject]:
    """The objects of scene `index`, largest first (painting order), without rendering.

    Seeded by (seed, index) alone, so a client can build any single sample without
    the others. Objects may overlap; later (smaller) ones paint over earlier ones.
    """
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects={max_objects!r} is out of range: use 1..{MAX_OBJECTS}")
    rng = np.random.default_rng([seed, index])
    count = int(rng.integers(1, max_objects + 1))
    sides = np.sort(rng.uniform(*SIDE_RANGE, size=count))[::-1]
    classes = rng.integers(len(CLASSES), size=count)
    colors = rng.integers(len(COLORS), size=count)
    color_names = list(COLORS)
    objects: list[SceneObject] = []
    for side, class_id, color in zip(sides, classes, colors):
        size = side / math.sqrt(AREA_FACTOR[class_id])
        center = _place(rng, size, objects)
        while center is None:  # crowded scene: shrink until it fits
            size *= 0.9
            center = _place(rng, size, objects)
        objects.append(SceneObject(int(class_id), color_names[color], center, float(size)))
    # Shrinking can reorder areas; a stable sort keeps the first of equals first.
    return sorted(objects, key=lambda o: -o.area)


def scene_label(spec: Sequence[SceneObject]) -> int:
    """The image label: the class of the largest object (the first of equals)."""
    return max(spec, key=lambda o: o.area).class_id


def synthetic_labels(cfg: DataConfig) -> np.ndarray:
    """Labels of all `cfg.num_samples` scenes, from their specs (no rendering)."""
    return _synthetic_labels(cfg.seed, cfg.num_samples, cfg.max_objects).copy()


@functools.lru_cache(maxsize=8)
def _synthetic_labels(seed: int, num_samples: int, max_objects: int) -> np.ndarray:
    return np.array([scene_label(scene_spec(seed, i, max_objects)) for i in range(num_samples)],
                    dtype=np.int64)


# Scenes from here on are never a client's or the teacher's (they take the first
# num_samples + public_samples): membership audits draw their held-out examples here.
HELD_OUT_START = 1_000_000_000


def held_out_indices(seed: int, max_objects: int, class_counts: Sequence[int],
                     start: int = HELD_OUT_START) -> np.ndarray:
    """Indices of fresh scenes from `start` on, `class_counts[c]` of each class c: held-out
    examples from the same distribution as a training set with that class histogram
    (a partition skews only the labels; given its label a scene is drawn the same way)."""
    need = np.asarray(class_counts, dtype=np.int64).copy()
    picked: list[int] = []
    index = start
    while need.sum() > 0:
        label = scene_label(scene_spec(seed, index, max_objects))
        if need[label] > 0:
            need[label] -= 1
            picked.append(index)
        index += 1
    return np.asarray(picked, dtype=np.int64)


# --------------------------------------------------------------------------- rendering


def _shape_mask(obj: SceneObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pixels (by their centres x, y) that the object covers."""
    dx, dy, r = x - obj.center[0], y - obj.center[1], obj.size
    shape = CLASSES[obj.class_id]
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # apex at (0, -r), base from (-r, r) to (r, r)
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        t = _CROSS_ARM * r
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= r) & (ay <= t)) | ((ax <= t) & (ay <= r))
    raise ValueError(f"unknown class_id {obj.class_id!r}: use 0..{len(CLASSES) - 1}")


# Depth (in scene units) of the ground plane: far at the top row, near at the bottom.
GROUND_DEPTH = (10.0, 4.0)
# Object k in painting order stands at OBJECT_DEPTH - DEPTH_STEP * k + DEPTH_TILT * (1 - y):
# each later-painted object is nearer than every earlier one (DEPTH_TILT < DEPTH_STEP) and
# every object is nearer than the ground (3.4 < 4), so the occlusions painted are the ones
# the depth map implies.
OBJECT_DEPTH, DEPTH_STEP, DEPTH_TILT = 3.0, 0.6, 0.4
TEXTURES = ("flat", "textured")
TEXTURED_NOISE_STD = 0.04  # grain of textured scenes
STRIPE_CONTRAST = 0.2  # stripes scale an object's colour by 1 +- this


def object_depth(obj: SceneObject, k: int) -> float:
    """The depth of the k-th painted object (see OBJECT_DEPTH)."""
    return OBJECT_DEPTH - DEPTH_STEP * k + DEPTH_TILT * (1.0 - obj.center[1])


def _textured_background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray
                         ) -> np.ndarray:
    """A smooth, dark, coloured field: a few low-frequency waves per channel around a
    random muted base colour, kept in [0.03, 0.45] so that every named colour stays
    brighter or more saturated than the ground it stands on."""
    base = rng.uniform(0.08, 0.25, size=3)
    field = np.empty((3, *x.shape), dtype=np.float64)
    for c in range(3):
        wave = np.zeros_like(x)
        for _ in range(3):
            fx, fy = rng.uniform(0.5, 3.0, size=2) * rng.choice([-1, 1], size=2)
            wave += np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
        field[c] = base[c] + 0.06 * wave
    return np.clip(field, 0.03, 0.45).astype(np.float32)


def _stripes(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Brightness factor 1 +- STRIPE_CONTRAST: stripes of random period and angle."""
    period = rng.uniform(0.08, 0.2)  # in image sides: 2.5-6.5 pixels at 32x32
    angle = rng.uniform(0, np.pi)
    phase = np.cos(angle) * x + np.sin(angle) * y
    return (1 + STRIPE_CONTRAST * np.sin(2 * np.pi * phase / period)).astype(np.float32)


def render_scene(spec: Sequence[SceneObject], image_size: int,
                 max_objects: int = MAX_OBJECTS, noise_seed: int | Sequence[int] = 0,
                 texture: str = "flat", texture_seed: int | Sequence[int] = 0
                 ) -> dict[str, np.ndarray]:
    """Paint a scene spec: image, segmentation, depth, boxes and object count as numpy
    arrays.

    "boxes" has `max_objects` rows (x0, y0, x1, y1 in [0, 1], spec order, zero rows
    after the last object) so that a batch of scenes stacks into one array. "depth" is
    the distance of what each pixel shows (GROUND_DEPTH, object_depth).
    """
    if texture not in TEXTURES:
        raise ValueError(f"texture={texture!r} is unknown: use one of {', '.join(TEXTURES)}")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size!r} is too small to draw every object "
                         f"visibly: use at least {_MIN_IMAGE_SIZE}")
    if len(spec) > max_objects:
        raise ValueError(f"the scene has {len(spec)} objects but max_objects={max_objects}: "
                         "raise max_objects to pad the boxes")
    centres = (np.arange(image_size) + 0.5) / image_size
    y, x = np.meshgrid(centres, centres, indexing="ij")
    textured = texture == "textured"
    texture_rng = np.random.default_rng(texture_seed)
    image = np.empty((3, image_size, image_size), dtype=np.float32)
    if textured:
        image[:] = _textured_background(texture_rng, x, y)
    else:
        image[:] = np.asarray(BACKGROUND, dtype=np.float32)[:, None, None]
    segmentation = np.zeros((image_size, image_size), dtype=np.int64)
    near, far = GROUND_DEPTH[1], GROUND_DEPTH[0]
    depth = (far + (near - far) * y).astype(np.float32)
    boxes = np.zeros((max_objects, 4), dtype=np.float32)
    for k, obj in enumerate(spec):
        mask = _shape_mask(obj, x, y)
        segmentation[mask] = obj.class_id + 1
        depth[mask] = object_depth(obj, k)
        color = np.asarray(COLORS[obj.color], dtype=np.float32)[:, None]
        if textured:
            image[:, mask] = np.clip(color * _stripes(texture_rng, x, y)[mask], 0.0, 1.0)
        else:
            image[:, mask] = color
        boxes[k] = np.clip(obj.box, 0.0, 1.0)
    std = TEXTURED_NOISE_STD if textured else NOISE_STD
    noise = np.random.default_rng(noise_seed).normal(0.0, std, image.shape)
    image = np.clip(image + noise.astype(np.float32), 0.0, 1.0)
    return {"image": image, "segmentation": segmentation, "depth": depth, "boxes": boxes,
            "num_objects": np.int64(len(spec))}


# --------------------------------------------------------------------------- text


def encode_tokens(words: Sequence[str], length: int) -> np.ndarray:
    """BOS, word ids, EOS, then PAD up to `length` (int64)."""
    if len(words) + 2 > length:
        raise ValueError(f"{len(words)} words need length >= {len(words) + 2}, got {length}")
    ids = [BOS_ID, *(WORD_TO_ID.get(w, UNK_ID) for w in words), EOS_ID]
    return np.array(ids + [PAD_ID] * (length - len(ids)), dtype=np.int64)


def caption_words(spec: Sequence[SceneObject], caption_len: int) -> list[str]:
    """"a big red circle and a small blue cross": objects largest first, as many as fit.

    Every object takes four words plus "and", so `caption_len` (with BOS and EOS) bounds
    how many objects a caption mentions; the largest one is always there.
    """
    if caption_len < 6:
        raise ValueError(f"caption_len={caption_len!r} cannot hold one object "
                         "(BOS + 'a big red circle' + EOS): use at least 6")
    words: list[str] = []
    for obj in sorted(spec, key=lambda o: -o.area):
        phrase = ["and"] if words else []
        phrase += ["a", "big" if math.sqrt(obj.area) >= BIG_SIDE else "small",
                   obj.color, CLASSES[obj.class_id]]
        if len(words) + len(phrase) + 2 > caption_len:
            break
        words += phrase
    return words


def scene_question(spec: Sequence[SceneObject], rng: np.random.Generator
                   ) -> tuple[list[str], str]:
    """A question about the scene and its true answer, one of four templates.

    "what shape is the <colour> object" is asked only when exactly one object has
    that colour; otherwise the colour question about the largest object is asked.
    "is there a <shape>" is answered "yes" about half of the time.
    """
    largest = max(spec, key=lambda o: o.area)
    template = int(rng.integers(4))
    colour_counts = {c: sum(o.color == c for o in spec) for c in COLORS}
    unique_colours = [c for c, n in colour_counts.items() if n == 1]
    if template == 3 and not unique_colours:
        template = 0
    if template == 0:
        return ["what", "color", "is", "the", "largest", CLASSES[largest.class_id]], largest.color
    if template == 1:
        return ["how", "many", "objects", "are", "there"], COUNT_WORDS[len(spec) - 1]
    if template == 2:
        present = sorted({o.class_id for o in spec})
        absent = [c for c in range(len(CLASSES)) if c not in present]
        ask_present = rng.random() < 0.5 or not absent
        class_id = int(rng.choice(present if ask_present else absent))
        return ["is", "there", "a", CLASSES[class_id]], "yes" if ask_present else "no"
    colour = unique_colours[int(rng.integers(len(unique_colours)))]
    obj = next(o for o in spec if o.color == colour)
    return ["what", "shape", "is", "the", colour, "object"], CLASSES[obj.class_id]


def synthetic_sample(seed: int, index: int, max_objects: int, image_size: int,
                     caption_len: int = 12, texture: str = "flat") -> dict[str, np.ndarray]:
    """Everything about scene `index` as numpy arrays (the item dict of SyntheticScenes)."""
    spec = scene_spec(seed, index, max_objects)
    sample = render_scene(spec, image_size, max_objects, noise_seed=[seed, index, 2],
                          texture=texture, texture_seed=[seed, index, 3])
    question, answer = scene_question(spec, np.random.default_rng([seed, index, 1]))
    sample["label"] = np.int64(scene_label(spec))
    sample["caption"] = encode_tokens(caption_words(spec, caption_len), caption_len)
    sample["question"] = encode_tokens(question, QUESTION_LEN)
    sample["answer"] = np.int64(ANSWERS.index(answer))
    return sample


# --------------------------------------------------------------------------- datasets

class SyntheticScenes(TensorDictDataset):
    """The synthetic scenes `indices` of `cfg`, rendered once at construction.

    Items: image [3,S,S] float32 in [0,1], label int64, segmentation [S,S] int64,
    depth [S,S] float32, boxes [max_objects,4] float32, num_objects int64,
    caption [caption_len] int64,
    question [QUESTION_LEN] int64, answer int64 (index into ANSWERS).
    """

    def __init__(self, cfg: DataConfig, indices: Sequence[int], caption_len: int = 12):
        self.indices = np.asarray(indices, dtype=np.int64)
        samples = [synthetic_sample(cfg.seed, int(i), cfg.max_objects, cfg.image_size,
                                    caption_len, cfg.texture) for i in self.indices]
        if samples:
            tensors = {k: torch.from_numpy(np.stack([s[k] for s in samples]))
                       for k in samples[0]}
        else:  # an empty dataset still has the right keys and trailing shapes
            probe = synthetic_sample(cfg.seed, 0, cfg.max_objects, cfg.image_size, caption_len,
                                     cfg.texture)
            tensors = {k: torch.from_numpy(np.asarray(v)[None][:0]) for k, v in probe.items()}
        super().__init__(tensors)
