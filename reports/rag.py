"""The RAG report: knowledge questions answered by retrieval at the receiver, and an
update of the knowledge base with no training step (docs/rag.md).

    python -m reports.rag [--config configs/mtsc_rag.yaml] [--out DIR] [key=value ...]

1. trains the mtsc model with retrieval (`rounds` epochs of `train_local` on the pooled
   training split: one receiver, since what is measured is retrieval, not the
   federation), counterfactual fact tables per batch (models/mtsc/train.py);
2. writes the reference facts as a chunk file and builds the knowledge-base file from
   it, as `python -m reports.knowledge rebuild` does, and loads it into the receiver;
3. at every SNR of channel.sweep_snr_db and k = 0, 1, 4, 16 retrieved chunks: VQA
   accuracy and the answers' BLEU, captioning BLEU-4 (when on), retrieval recall@k (the asked fact among the
   k), and milliseconds per query: the faiss search alone and the receiver's whole
   forward (median of repeats, one thread, a batch of 64);
4. rewrites `--changed` facts to another meaning in the file (add replaces chunks by
   id), reloads it and asks again: accuracy on the questions about changed facts, scored
   against the new facts, with the old base and with the new one; no parameter changes;
5. writes report.json and report.png and prints Markdown tables.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common.config import ExperimentConfig, need
from common.data import load_partition
from common.data.facts import MEANING_ANSWER0, MEANINGS, SUBJECTS, fact_chunks, fact_table
from common.data.tensor_dataset import TensorDictDataset
from models.mtsc import model as mtsc_model
from models.mtsc import workload as mtsc
from models.mtsc.knowledge import KnowledgeBase, write_chunks
from reports.cli import (
    finish_report,
    median_ms,
    report_config,
    report_folder,
    report_parser,
)

KS = (0, 1, 4, 16)
LATENCY_BATCH = 64


def check(cfg: ExperimentConfig) -> None:
    need(cfg.workload == "mtsc", "workload", cfg.workload, "'mtsc' for the RAG report")
    need(cfg.data.questions == "knowledge", "data.questions", cfg.data.questions,
         "'knowledge' for the RAG report (its questions are answered from the facts)")
    need(cfg.model.rag_k >= max(KS), "model.rag_k", cfg.model.rag_k,
         f">= {max(KS)}: the report asks with up to {max(KS)} chunks")
    need(len(cfg.channel.sweep_snr_db) > 0, "channel.sweep_snr_db", cfg.channel.sweep_snr_db,
         "the SNRs (dB) to measure at, e.g. [-5, 5, 20]")


def _at_snr(cfg: ExperimentConfig, snr_db: float) -> ExperimentConfig:
    channel = dataclasses.replace(cfg.channel, snr_db=snr_db, snr_range_db=None)
    return dataclasses.replace(cfg, channel=channel)


def relabel(data: TensorDictDataset, table: np.ndarray) -> TensorDictDataset:
    """The knowledge questions of `data` with their answers from `table`."""
    tensors = dict(data.tensors)
    tensors["answer"] = MEANING_ANSWER0 + torch.from_numpy(table)[tensors["subject"]]
    return TensorDictDataset(tensors)


@torch.no_grad()
def recall_at_k(model, data: TensorDictDataset, cfg: ExperimentConfig, k: int) -> float:
    """Share of questions whose own fact (chunk id "<colour>-<shape>") is among the k
    chunks retrieved at the receiver, at the evaluation's seeded channel."""
    if k == 0:
        return 0.0
    retriever = model.receiver.retriever
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        tx, received, snr = model.uplink(data.tensors)
        memory = model.receiver.jscc_decoder(received, tx.mask, snr)
        query = torch.nn.functional.normalize(retriever.query(
            memory[:, -retriever.question_len:].flatten(1)), dim=-1).numpy()
    ids = retriever.knowledge.ids
    _, rows = retriever.knowledge.search(query, k)
    asked = np.asarray(["-".join(SUBJECTS[s]) for s in data.tensors["subject"].tolist()])
    got = np.asarray(ids)[rows]
    return float((got == asked[:, None]).any(1).mean())




@torch.no_grad()
def latency(model, data: TensorDictDataset, k: int) -> dict[str, float]:
    """ms per query: the faiss search alone, and the receiver's forward (query, search,
    reading the chunks, the LAM decoder), over a batch of LATENCY_BATCH."""
    retriever = model.receiver.retriever
    batch = {key: v[:LATENCY_BATCH] for key, v in data.tensors.items()}
    n = len(batch["image"])
    tx, received, snr = model.uplink(batch, snr_db=torch.full((n,), 10.0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        retriever.k = k
        query = np.ascontiguousarray(np.random.default_rng(0).normal(
            size=(n, retriever.knowledge.dim)).astype(np.float32))
        search = median_ms(lambda: retriever.knowledge.search(query, k), 7) if k else 0.0
        forward = median_ms(lambda: model.receiver(received, tx.mask, snr), 7)
    finally:
        torch.set_num_threads(threads)
    return {"search_ms_per_query": search / n, "receiver_ms_per_query": forward / n}


def rewritten(table: np.ndarray, changed: int, seed: int) -> np.ndarray:
    """`table` with `changed` subjects given another meaning (seeded)."""
    rng = np.random.default_rng([seed, 0x0bd7])
    new = table.copy()
    for s in rng.choice(len(table), size=changed, replace=False):
        new[s] = (table[s] + rng.integers(1, len(MEANINGS))) % len(MEANINGS)
    return new


def run(cfg: ExperimentConfig, out: Path, changed: int) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    train, test = load_partition(cfg.data, 0, 1, cfg.model.caption_len,
                                 needs=mtsc_model.data_needs(cfg))
    model = mtsc.build(cfg)
    for epoch in tqdm(range(cfg.rounds), desc="training with retrieval", unit="epoch"):
        metrics = mtsc.train_local(model, train, cfg, seed=epoch)
    retriever = model.receiver.retriever
    embedder = retriever.key_embedder

    table = fact_table(cfg.data.seed)
    write_chunks(out / "facts.jsonl", fact_chunks(table))
    kb_path = out / "knowledge.npz"
    KnowledgeBase.from_chunks(fact_chunks(table), embedder, cfg.model.ivf_above,
                              cfg.model.rag_nprobe).save(kb_path)
    retriever.knowledge = KnowledgeBase.load(kb_path, embedder)

    cells = []
    grid = [(snr, k) for snr in cfg.channel.sweep_snr_db for k in KS]
    for snr, k in tqdm(grid, desc="SNR x k", unit="cell"):
        at = _at_snr(cfg, snr)
        retriever.k = k
        scores = mtsc.evaluate(model, test, at)
        cell = {"snr_db": snr, "k": k, "vqa_accuracy": scores["vqa_accuracy"],
                "recall_at_k": recall_at_k(model, test, at, k), **latency(model, test, k)}
        for key in ("vqa_bleu", "bleu"):  # the answers' BLEU, the captions' BLEU-4
            if key in scores:
                cell[key] = scores[key]
        cells.append(cell)

    # The update: the facts rewritten in the file, the base reloaded, no training step.
    new_table = rewritten(table, changed, cfg.seed)
    moved = np.flatnonzero(new_table != table)
    params = {n: p.detach().clone() for n, p in model.state_dict().items()}
    old_kb = retriever.knowledge
    new_chunks = [c for s, c in enumerate(fact_chunks(new_table)) if s in set(moved.tolist())]
    write_chunks(out / "rewritten.jsonl", new_chunks)
    updated = KnowledgeBase.load(kb_path, embedder).add(new_chunks, embedder)
    updated.save(kb_path)
    asked_changed = np.isin(test.tensors["subject"].numpy(), moved)
    idx = np.flatnonzero(asked_changed)
    changed_test = TensorDictDataset({k: v[idx] for k, v in relabel(test, new_table).tensors.items()})
    old_answers = TensorDictDataset({k: v[idx] for k, v in relabel(test, table).tensors.items()})
    unchanged_idx = np.flatnonzero(~asked_changed)
    unchanged_test = TensorDictDataset({k: v[unchanged_idx] for k, v in test.tensors.items()})
    update = []
    for snr in cfg.channel.sweep_snr_db:
        at = _at_snr(cfg, snr)
        retriever.k = 4
        retriever.knowledge = old_kb
        before = mtsc.evaluate(model, changed_test, at)["vqa_accuracy"]
        before_old = mtsc.evaluate(model, old_answers, at)["vqa_accuracy"]
        retriever.knowledge = KnowledgeBase.load(kb_path, embedder)
        after = mtsc.evaluate(model, changed_test, at)["vqa_accuracy"]
        after_unchanged = mtsc.evaluate(model, unchanged_test, at)["vqa_accuracy"]
        update.append({"snr_db": snr, "k": 4, "changed_facts": int(len(moved)),
                       "questions_on_changed": int(len(idx)),
                       "accuracy_on_changed_before": before,
                       "old_answers_before": before_old,
                       "accuracy_on_changed_after": after,
                       "accuracy_on_unchanged_after": after_unchanged})
    same = all(torch.equal(params[n], p) for n, p in model.state_dict().items())
    retriever.k = cfg.model.rag_k
    return {"config": cfg.to_dict(), "train": metrics, "chance": 1 / len(MEANINGS),
            "test_questions": len(test), "cells": cells, "update": update,
            "parameters_unchanged_by_update": same}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    snrs = sorted({c["snr_db"] for c in report["cells"]})
    for snr in snrs:
        rows = [c for c in report["cells"] if c["snr_db"] == snr]
        ax.plot([str(c["k"]) for c in rows], [c["vqa_accuracy"] for c in rows], "o-",
                label=f"{snr:g} dB")
    ax.axhline(report["chance"], color="grey", ls=":", label="chance")
    ax.set(xlabel="retrieved chunks k", ylabel="VQA accuracy (knowledge questions)", ylim=(0, 1.02))
    ax.legend()
    rows = [c for c in report["cells"] if c["snr_db"] == snrs[0]]
    bx.plot([str(c["k"]) for c in rows], [c["receiver_ms_per_query"] for c in rows], "o-",
            label="receiver forward")
    bx.plot([str(c["k"]) for c in rows], [c["search_ms_per_query"] for c in rows], "s-",
            label="faiss search")
    bx.set(xlabel="retrieved chunks k", ylabel="ms per query (1 thread)")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    lines = ["| SNR (dB) | k | VQA accuracy | VQA BLEU | recall@k | caption BLEU-4 | "
             "search ms/query | receiver ms/query |", "|---|---|---|---|---|---|---|---|"]
    for c in report["cells"]:
        vqa_bleu, bleu = (f"{c[key]:.3f}" if key in c else "-" for key in ("vqa_bleu", "bleu"))
        lines.append(f"| {c['snr_db']:g} | {c['k']} | {c['vqa_accuracy']:.3f} | {vqa_bleu} | "
                     f"{c['recall_at_k']:.3f} | {bleu} | {c['search_ms_per_query']:.4f} | "
                     f"{c['receiver_ms_per_query']:.3f} |")
    lines += ["", "| SNR (dB) | changed facts | questions on them | accuracy before update "
              "| after | unchanged facts after |", "|---|---|---|---|---|---|"]
    for u in report["update"]:
        lines.append(f"| {u['snr_db']:g} | {u['changed_facts']} | {u['questions_on_changed']} | "
                     f"{u['accuracy_on_changed_before']:.3f} | {u['accuracy_on_changed_after']:.3f}"
                     f" | {u['accuracy_on_unchanged_after']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = report_parser("rag", __doc__, "configs/mtsc_rag.yaml")
    parser.add_argument("--changed", type=int, default=8,
                        help="facts rewritten in the update (default 8 of 24)")
    args = parser.parse_args(argv)
    cfg = report_config(args, check)
    out = report_folder(args, cfg, "rag")
    report = run(cfg, out, args.changed)
    finish_report(cfg, out, report, plot, markdown(report))


if __name__ == "__main__":
    main()
