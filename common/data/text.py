"""Words for the text tasks: the vocabulary captions and questions are written in, and
the closed answer set of VQA.

The synthetic scenes speak a fixed vocabulary (scenes.VOCAB, scenes.ANSWERS). A user's
source brings its own captions, questions and answers; their vocabulary is built from
every text of the source (so every client of one source agrees on it, as they would on
a shipped tokenizer): lower-cased words in order of first appearance, after the special
tokens that scenes.py defines. A word-level vocabulary, not a subword tokenizer,
because the LAM's decoder is built from a config with random weights (DESIGN.md: no
downloads), so a pre-trained tokenizer would bring nothing but its download.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import numpy as np

from common.data.scenes import (
    _SPECIAL_TOKENS,
    ANSWERS,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    QUESTION_LEN,
    UNK_ID,
    VOCAB,
)

_WORD = re.compile(r"[a-z0-9']+")
MAX_QUESTION_LEN = 24  # BOS + 22 words + EOS: longer questions are cut


def words(text: str) -> list[str]:
    """A text as the words the vocabulary holds: lower-cased runs of letters and digits."""
    return _WORD.findall(str(text).lower())


@dataclasses.dataclass(frozen=True)
class TextVocab:
    """The words of a source's texts and its VQA answer set."""

    words: tuple[str, ...]  # special tokens first (PAD, BOS, EOS, UNK), then the words
    answers: tuple[str, ...]  # the closed answer set: an example's "answer" indexes it
    question_len: int  # BOS + the longest question + EOS

    def __post_init__(self):
        object.__setattr__(self, "_ids", {w: i for i, w in enumerate(self.words)})

    def encode(self, text: str, length: int) -> np.ndarray:
        """BOS, word ids, EOS, PAD up to `length`; words past length - 2 are cut."""
        ids = [self._ids.get(w, UNK_ID) for w in words(text)][: length - 2]
        ids = [BOS_ID, *ids, EOS_ID]
        return np.array(ids + [PAD_ID] * (length - len(ids)), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids as text: stops at EOS, skips PAD and BOS."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            out.append(self.words[i] if 0 <= i < len(self.words) else "<unk>")
        return " ".join(out)


SYNTHETIC_VOCAB = TextVocab(VOCAB, ANSWERS, QUESTION_LEN)


def build_vocab(captions: Iterable[str], questions: Iterable[str],
                answers: Iterable[str]) -> TextVocab:
    """The vocabulary of a source's texts (in order of first appearance, so it does not
    depend on the order of a set) and its answers (each a whole string, stripped and
    lower-cased)."""
    seen = dict.fromkeys(_SPECIAL_TOKENS)
    longest = 0
    for text in captions:
        seen.update(dict.fromkeys(words(text)))
    for text in questions:
        q = words(text)
        longest = max(longest, len(q))
        seen.update(dict.fromkeys(q))
    answer_set = tuple(dict.fromkeys(" ".join(words(a)) for a in answers))
    for a in answer_set:
        seen.update(dict.fromkeys(a.split()))
    return TextVocab(tuple(seen), answer_set, min(longest + 2, MAX_QUESTION_LEN))
