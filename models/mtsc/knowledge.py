"""The receiver's knowledge base (LAM-MTSC's retrieval-augmented generation): text chunks,
their embeddings and a faiss index over them, saved as one file.

The paper updates knowledge with RAG instead of retraining; here the knowledge base sits
on the receiver's side (the server half of the split, or a client's own copy of the
receiver in federated LoRA). It is public: made from a file of chunks or from the
synthetic fact table of the config (common/data/facts.py), never from a client's data,
and it is not a tensor of the model, so no message ever carries it
(models/mtsc/workload.py: `shared_state` holds LoRA adapters only).

- Embeddings: by default the frozen base LAM encoder's word embeddings (no LoRA, so
  the index never goes stale while the adapters train), mean-pooled over a chunk's
  words and L2-normalised, so the inner product is the cosine (`LamEmbedder`); or a
  local sentence-embedding model (a folder that transformers' AutoModel loads),
  its hidden states mean-pooled the same way.
- Index: exact inner product (faiss IndexFlatIP); above `ivf_above` chunks an inverted
  file (IndexIVFFlat, about sqrt(N) lists, `nprobe` of them searched), trained on the
  chunks' own embeddings, which trades a little recall for sub-linear search.
- File: one .npz holding the chunks, their embeddings, the serialised index and what
  embedded them. A change is written to a new file in the same folder and renamed
  over the old one, so a reader sees the old or the new base, never half of one; a
  file that is not such a base, or one embedded in another space, is refused with the
  command that rebuilds it.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import Tensor, nn

from common.data.scenes import BOS_ID, EOS_ID, PAD_ID
from common.data.text import TextVocab

FORMAT = "fedsemcom-knowledge-base/1"
REBUILD = ("python -m reports.knowledge rebuild --config <experiment.yaml> --kb <file> "
           "[--chunks <chunks.jsonl>]")


class KnowledgeError(ValueError):
    """A knowledge base or chunk file that cannot be used as it is."""


def read_chunks(path: str | Path) -> list[dict[str, str]]:
    """Chunks from a JSON-lines file: one object per line with "text" and, optionally,
    "id" (default "<file stem>-<line>"); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise KnowledgeError(f"chunk file {str(path)!r} does not exist: give a JSON-lines "
                             'file with one {"id": ..., "text": ...} object per line')
    chunks = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise KnowledgeError(f"{path}:{n}: not JSON ({err.msg}); each line must be an "
                                 'object such as {"id": "fact-1", "text": "..."}') from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) \
                or not item["text"].strip():
            raise KnowledgeError(f"{path}:{n}: got {line[:80]!r}; each line needs a non-empty "
                                 'string "text"')
        chunks.append({"id": str(item.get("id", f"{path.stem}-{n}")), "text": item["text"]})
    _unique([c["id"] for c in chunks], str(path))
    return chunks


def write_chunks(path: str | Path, chunks: Iterable[dict[str, str]]) -> None:
    lines = [json.dumps({"id": c["id"], "text": c["text"]}) for c in chunks]
    _atomic_write(Path(path), lambda f: f.write(("\n".join(lines) + "\n").encode()))


def _unique(ids: Sequence[str], where: str) -> None:
    seen, dup = set(), []
    for i in ids:
        if i in seen and i not in dup:
            dup.append(i)
        seen.add(i)
    if dup:
        raise KnowledgeError(f"{where}: chunk ids {dup[:5]} appear more than once; give "
                             "every chunk its own id")


def _atomic_write(path: Path, write) -> None:
    """Write to a new file beside `path`, then rename it over `path` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- embedders


def _mean_pool(states: Tensor, keep: Tensor) -> Tensor:
    keep = keep.unsqueeze(-1).to(states.dtype)
    pooled = (states * keep).sum(1) / keep.sum(1).clamp_min(1.0)
    return nn.functional.normalize(pooled, dim=-1)


class LamEmbedder(nn.Module):
    """Texts in the LAM's own space, over the source's vocabulary (common/data/text.py):
    a text's embedding is the normalised mean of the frozen LAM encoder's word
    embeddings, a bag of words (texts that share words land close together, even with a
    randomly built LAM). The encoder's hidden states would embed the whole text, but
    a randomly built LAM gives every text nearly the same direction (the question's own
    fact comes first for about 1 question in 5 of the synthetic task, against about 4
    in 5 with the bag of words). The frozen encoder's states are what the receiver
    reads of a retrieved chunk (`states`)."""

    def __init__(self, encoder: nn.Module, vocab: TextVocab, chunk_len: int, fingerprint: str):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.vocab, self.chunk_len, self.fingerprint = vocab, chunk_len, fingerprint
        self.dim = int(encoder.config.d_model)

    def tokens(self, texts: Sequence[str]) -> Tensor:
        """[N, chunk_len] token ids (BOS, words, EOS, PAD; longer texts are cut)."""
        ids = [self.vocab.encode(t, self.chunk_len) for t in texts]
        return torch.from_numpy(np.stack(ids)) if ids else torch.zeros(0, self.chunk_len,
                                                                         dtype=torch.long)

    @torch.no_grad()
    def states(self, tokens: Tensor) -> Tensor:
        """[N, L, D] hidden states of the frozen encoder."""
        keep = (tokens != PAD_ID).long()
        return self.encoder(input_ids=tokens, attention_mask=keep).last_hidden_state

    @torch.no_grad()
    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """[N, D] unit-norm bags of the LAM's word embeddings (special tokens left out)."""
        tokens = tokens.to(self.encoder.embed_tokens.weight.device)
        words = (tokens != PAD_ID) & (tokens != BOS_ID) & (tokens != EOS_ID)
        return _mean_pool(self.encoder.embed_tokens(tokens), words)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_tokens(self.tokens(texts)).float().cpu().numpy()


class TransformersEmbedder:
    """Texts embedded by a local sentence-embedding model: a folder that transformers'
    AutoTokenizer and AutoModel load with no download, mean-pooled and normalised."""

    def __init__(self, path: str):
        from transformers import AutoModel, AutoTokenizer

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise KnowledgeError(f"model.knowledge_embedder={path!r}: no config.json there; "
                                 "point it at a local folder saved with save_pretrained() "
                                 "(model and tokenizer), or set it to null to embed with "
                                 "the LAM encoder")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        self.dim = int(self.model.config.hidden_size)
        self.fingerprint = f"transformers {folder.resolve().name} dim={self.dim}"

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        states = self.model(**batch).last_hidden_state
        return _mean_pool(states, batch["attention_mask"].bool()).float().numpy()


# ----------------------------------------------------------------------------- the base


def _index(embeddings: np.ndarray, ivf_above: int, nprobe: int) -> faiss.Index:
    n, dim = embeddings.shape
    if n <= ivf_above:
        index = faiss.IndexFlatIP(dim)
    else:
        # About sqrt(N) lists, each trained on >= 39 points (faiss's own minimum).
        nlist = max(1, min(int(np.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
        index.nprobe = min(nprobe, nlist)
    if n:
        index.add(embeddings)
    return index


@dataclass
class KnowledgeBase:
    """Chunks (ids, texts), their unit-norm embeddings [N, dim] and the faiss index.
    `add` and `remove` return a new base; the receiver swaps it in (no training)."""

    ids: list[str]
    texts: list[str]
    embeddings: np.ndarray
    embedder: str  # what embedded the chunks (LamEmbedder / TransformersEmbedder fingerprint)
    ivf_above: int = 10_000
    nprobe: int = 8
    index: faiss.Index | None = field(default=None, repr=False)

    def __post_init__(self):
        self.embeddings = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        _unique(self.ids, "the knowledge base")
        if self.index is None:
            self.index = _index(self.embeddings, self.ivf_above, self.nprobe)

    @classmethod
    def from_chunks(cls, chunks: Sequence[dict[str, str]], embedder, ivf_above: int = 10_000,
                    nprobe: int = 8) -> KnowledgeBase:
        texts = [c["text"] for c in chunks]
        return cls([c["id"] for c in chunks], texts, embedder.embed(texts), embedder.fingerprint,
                   ivf_above, nprobe)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, chunks: Sequence[dict[str, str]], embedder) -> KnowledgeBase:
        """This base with `chunks` added; a chunk whose id is already there replaces it."""
        self.check_embedder(embedder)
        new = {c["id"] for c in chunks}
        keep = [i for i, cid in enumerate(self.ids) if cid not in new]
        added = KnowledgeBase.from_chunks(chunks, embedder, self.ivf_above, self.nprobe)
        return KnowledgeBase([self.ids[i] for i in keep] + added.ids,
                             [self.texts[i] for i in keep] + added.texts,
                             np.concatenate([self.embeddings[keep], added.embeddings]),
                             self.embedder, self.ivf_above, self.nprobe)

    def remove(self, ids: Iterable[str]) -> KnowledgeBase:
        ids = list(ids)
        missing = [i for i in ids if i not in set(self.ids)]
        if missing:
            raise KnowledgeError(f"chunk ids {missing[:5]} are not in the knowledge base "
                                 f"({len(self)} chunks); `search` shows the ids there")
        drop = set(ids)
        keep = [i for i, cid in enumerate(self.ids) if cid not in drop]
        return KnowledgeBase([self.ids[i] for i in keep], [self.texts[i] for i in keep],
                             self.embeddings[keep], self.embedder, self.ivf_above, self.nprobe)

    def rebuild(self, embedder) -> KnowledgeBase:
        """The same chunks embedded and indexed anew (after the embedder changed)."""
        chunks = [{"id": i, "text": t} for i, t in zip(self.ids, self.texts)]
        return KnowledgeBase.from_chunks(chunks, embedder, self.ivf_above, self.nprobe)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) [B, min(k, N)] of the best chunks per unit-norm query [B, dim];
        an IVF search that finds fewer than k fills with the best row found."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise KnowledgeError(f"queries of shape {queries.shape} for a knowledge base of "
                                 f"dimension {self.dim}")
        k = min(k, len(self))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, rows = self.index.search(queries, k)
        missing = rows < 0
        if missing.any():
            rows = np.where(missing, rows[:, :1], rows)
            scores = np.where(missing, -np.inf, scores)
        return scores, rows

    def check_embedder(self, embedder) -> None:
        if embedder.fingerprint != self.embedder or embedder.dim != self.dim:
            raise KnowledgeError(
                f"the knowledge base was embedded by {self.embedder!r} ({self.dim} "
                f"dimensions), this config embeds with {embedder.fingerprint!r} ({embedder.dim} "
                f"dimensions): rebuild it with {REBUILD}")

    # ------------------------------------------------------------------ file

    def save(self, path: str | Path) -> None:
        """Write the base to `path` (.npz): a new file, then renamed over the old one."""
        meta = {"format": FORMAT, "embedder": self.embedder, "dim": self.dim,
                "ivf_above": self.ivf_above, "nprobe": self.nprobe}
        arrays = {"ids": np.asarray(self.ids, dtype=str), "texts": np.asarray(self.texts, dtype=str),
                  "embeddings": self.embeddings, "index": faiss.serialize_index(self.index),
                  "meta": np.asarray(json.dumps(meta))}
        _atomic_write(Path(path), lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | Path, embedder=None) -> KnowledgeBase:
        """The base saved at `path`; refused, with the fix, when the file is missing, is
        not a knowledge base, is inconsistent, or was embedded by another embedder than
        `embedder` (a config with another LAM, model.d_model or embedding model)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise KnowledgeError(f"model.knowledge_base={str(path)!r} does not exist: make it "
                                 f"with {REBUILD}, or set model.knowledge_base to null")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                ids, texts = z["ids"].tolist(), z["texts"].tolist()
                embeddings = z["embeddings"]
                index = faiss.deserialize_index(z["index"])
        except (OSError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile) as err:
            raise KnowledgeError(f"{path} is not a readable knowledge base ({type(err).__name__}:"
                                 f" {str(err)[:200]}); rebuild it with {REBUILD}") from None
        if meta.get("format") != FORMAT:
            raise KnowledgeError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}: "
                                 f"rebuild it with {REBUILD}")
        n, dim = len(ids), int(meta.get("dim", -1))
        if not (embeddings.ndim == 2 and embeddings.shape == (n, dim) and len(texts) == n
                and index.d == dim and index.ntotal == n):
            raise KnowledgeError(
                f"{path} is inconsistent: {n} ids, {len(texts)} texts, embeddings of shape "
                f"{embeddings.shape}, an index of {index.ntotal} vectors in {index.d} dimensions "
                f"(meta: {dim}); rebuild it with {REBUILD}")
        kb = cls(ids, texts, embeddings, meta["embedder"], int(meta["ivf_above"]),
                 int(meta["nprobe"]), index)
        if embedder is not None:
            try:
                kb.check_embedder(embedder)
            except KnowledgeError as err:
                raise KnowledgeError(f"{path}: {err}") from None
        return kb
