"""Tiny datasets in the layouts users bring, written from the synthetic scenes so that
their labels, masks, captions and answers are true: an image folder (one sub-folder per
class, masks mirroring it, metadata.jsonl with the texts) and a Hugging Face dataset
saved as parquet (image, label, mask and text columns). Images are 40 x 48 PNGs, so
every loader's resize and centre crop is exercised."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from common.data.scenes import (
    ANSWERS,
    CLASSES,
    caption_words,
    render_scene,
    scene_label,
    scene_question,
    scene_spec,
)

HEIGHT, WIDTH = 40, 48


def scene_records(n: int, seed: int = 7) -> list[dict]:
    """n scenes as (PIL image, label, PIL mask, caption, question, answer)."""
    out = []
    for i in range(n):
        spec = scene_spec(seed, i, 2)
        s = render_scene(spec, WIDTH, 2, noise_seed=[seed, i])
        image = (s["image"].transpose(1, 2, 0)[:HEIGHT] * 255).round().astype(np.uint8)
        mask = s["segmentation"][:HEIGHT].astype(np.uint8)
        question, answer = scene_question(spec, np.random.default_rng([seed, i, 1]))
        assert answer in ANSWERS
        out.append({"image": Image.fromarray(image), "label": scene_label(spec),
                    "mask": Image.fromarray(mask), "caption": " ".join(caption_words(spec, 12)),
                    "question": " ".join(question), "answer": answer})
    return out


def write_image_folder(root: Path, n: int = 48, masks: bool = True, texts: bool = True
                       ) -> tuple[Path, Path | None]:
    """root/images/<class>/<i>.png (+ metadata.jsonl), root/masks/<class>/<i>.png."""
    images, mask_root = root / "images", root / "masks"
    lines = []
    for i, r in enumerate(scene_records(n)):
        rel = Path(CLASSES[r["label"]]) / f"{i:04d}.png"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        r["image"].save(images / rel)
        if masks:
            (mask_root / rel).parent.mkdir(parents=True, exist_ok=True)
            r["mask"].save(mask_root / rel)
        lines.append(json.dumps({"file_name": rel.as_posix(), "caption": r["caption"],
                                 "question": r["question"], "answer": r["answer"]}))
    if texts:
        (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return images, mask_root if masks else None


def write_parquet(path: Path, n: int = 48) -> Path:
    """A `datasets` dataset with image, label (ClassLabel), mask and text columns."""
    import datasets

    rows = scene_records(n)
    features = datasets.Features({
        "image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES)),
        "mask": datasets.Image(), "caption": datasets.Value("string"),
        "question": datasets.Value("string"), "answer": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features},
                                    features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))
    return path


def folder_overrides(images: Path, masks: Path | None) -> list[str]:
    out = ["data.name=folder", f"data.root={images}"]
    return out + ([f"data.masks_root={masks}"] if masks else [])


def parquet_overrides(path: Path) -> list[str]:
    return ["data.name=hf", "data.hf_dataset=parquet", f"data.data_files=[{path}]"]
