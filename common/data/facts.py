"""The synthetic knowledge task: what a shape of a colour stands for.

A fact table gives every subject (a colour and a shape, "red circle") a meaning drawn
from MEANINGS; a fact is the sentence "the red circle means apple", and a knowledge
question asks "what does the red circle mean" about one object of the scene. The
answer is in the fact table and nowhere in the image, so a receiver that does not read
the table can only guess (chance: 1 / len(MEANINGS)).

`fact_table(seed)` is the reference table: the knowledge base a receiver starts from
and the answers of every example's question (common/data/scenes.py). Training draws
other tables (`counterfactual_table`), one per batch, so that the meaning of "red
circle" changes from batch to batch and cannot be memorised from the question: reading
the retrieved fact is the only way to be right, which is what lets a rewritten fact
change the answers with no training step (models/mtsc/knowledge.py).

The words are appended to the scenes' vocabulary and answer set (KNOWLEDGE_VOCAB), so
every scene word keeps its id.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from common.config import DataConfig
from common.data.scenes import (
    ANSWERS,
    CLASSES,
    COLORS,
    QUESTION_LEN,
    VOCAB,
    SceneObject,
    SyntheticScenes,
    scene_spec,
)
from common.data.text import TextVocab

SUBJECTS: tuple[tuple[str, str], ...] = tuple((c, s) for s in CLASSES for c in COLORS)
"""(colour, shape) pairs; a subject's id is its index here."""

MEANINGS = ("apple", "river", "stone", "cloud", "tiger", "bread",
            "candle", "mirror", "garden", "silver", "thunder", "violin")
"""What a subject can stand for; answer id of meaning m: MEANING_ANSWER0 + m."""

MEANING_ANSWER0 = len(ANSWERS)
KNOWLEDGE_VOCAB = TextVocab(VOCAB + ("does", "mean", "means") + MEANINGS,
                            ANSWERS + MEANINGS, QUESTION_LEN)


def subject_id(colour: str, shape: str) -> int:
    return SUBJECTS.index((colour, shape))


def fact_table(seed: int) -> np.ndarray:
    """The reference table of `seed`: meaning ids [len(SUBJECTS)] (int64)."""
    return counterfactual_table(seed, 0xfac7)


def counterfactual_table(*key: int) -> np.ndarray:
    """A table drawn from `key` alone (each subject's meaning uniform, independent)."""
    rng = np.random.default_rng([*key])
    return rng.integers(len(MEANINGS), size=len(SUBJECTS)).astype(np.int64)


def fact_text(subject: int, meaning: int) -> str:
    colour, shape = SUBJECTS[subject]
    return f"the {colour} {shape} means {MEANINGS[meaning]}"


def fact_chunks(table: Sequence[int]) -> list[dict[str, str]]:
    """The facts of a table as knowledge-base chunks: {"id": "red-circle", "text": ...}."""
    return [{"id": "-".join(SUBJECTS[s]), "text": fact_text(s, int(m))}
            for s, m in enumerate(table)]


def knowledge_question(spec: Sequence[SceneObject], rng: np.random.Generator
                       ) -> tuple[list[str], int]:
    """"what does the red circle mean" about one object of the scene, and its subject."""
    obj = spec[int(rng.integers(len(spec)))]
    shape = CLASSES[obj.class_id]
    return ["what", "does", "the", obj.color, shape, "mean"], subject_id(obj.color, shape)


class KnowledgeScenes(SyntheticScenes):
    """The synthetic scenes `indices` with a knowledge question each (data.questions:
    knowledge): the items of SyntheticScenes, their question and answer replaced, plus
    "subject" (int64, the subject asked about). Answers follow the reference table of
    `cfg.seed`; training swaps in a counterfactual table's answers batch by batch."""

    def __init__(self, cfg: DataConfig, indices: Sequence[int], caption_len: int = 12):
        super().__init__(cfg, indices, caption_len)
        table = fact_table(cfg.seed)
        questions, subjects = [], []
        for i in self.indices:
            rng = np.random.default_rng([cfg.seed, int(i), 4])
            words, subject = knowledge_question(scene_spec(cfg.seed, int(i), cfg.max_objects),
                                                rng)
            questions.append(KNOWLEDGE_VOCAB.encode(" ".join(words), QUESTION_LEN))
            subjects.append(subject)
        subject = torch.as_tensor(np.asarray(subjects, dtype=np.int64).reshape(-1))
        self.tensors["question"] = torch.from_numpy(
            np.asarray(questions, dtype=np.int64).reshape(-1, QUESTION_LEN))
        self.tensors["subject"] = subject
        self.tensors["answer"] = MEANING_ANSWER0 + torch.from_numpy(table)[subject]
