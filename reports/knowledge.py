"""The receiver's knowledge base from the command line (models/mtsc/knowledge.py).

    python -m reports.knowledge facts   --out facts.jsonl          [--config ...] [key=value ...]
    python -m reports.knowledge rebuild [--chunks facts.jsonl] [--kb FILE] [--config ...]
    python -m reports.knowledge add     --chunks more.jsonl  [--kb FILE] [--config ...]
    python -m reports.knowledge remove  --ids red-circle ... [--kb FILE] [--config ...]
    python -m reports.knowledge search  "what does the red circle mean" [-k 4] [--kb FILE]

`facts` writes the synthetic fact table of data.seed as a chunk file (JSON lines of
{"id", "text"}); `rebuild` embeds a chunk file into a new knowledge-base file (its
chunks replace what was there), or without --chunks embeds the base's own chunks anew
(after the embedder changed: another LAM, model.d_model or embedding model); `add` embeds chunks into the base (a chunk whose id is there replaces it);
`remove` drops chunks by id; `search` prints the best chunks for a text. The base is
`--kb`, or model.knowledge_base of the config. Every change writes a new file and renames
it over the old one, so a receiver reading it never sees half a base; a receiver picks
the change up when it next loads the base, with no training step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import ConfigError, load_config
from common.data.facts import fact_chunks, fact_table


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reports.knowledge",
                                     description="The receiver's knowledge base: write the "
                                     "synthetic facts, rebuild, add, remove, search.")
    parser.add_argument("action", choices=("facts", "rebuild", "add", "remove", "search"))
    parser.add_argument("text", nargs="?", help="search: the text to search for")
    parser.add_argument("--config", default="configs/mtsc_rag.yaml")
    parser.add_argument("--kb", type=Path, default=None,
                        help="the knowledge-base file (default: model.knowledge_base)")
    parser.add_argument("--chunks", type=Path, help="rebuild / add: a JSON-lines chunk file")
    parser.add_argument("--ids", nargs="+", default=[], help="remove: chunk ids")
    parser.add_argument("--out", type=Path, help="facts: the chunk file to write")
    parser.add_argument("-k", type=int, default=4, help="search: how many chunks")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", dest="overrides",
                        help="override config keys, e.g. --set model.d_model=32")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)

    def fail(message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        fail(str(err))
    if args.action == "facts":
        if args.out is None:
            fail("facts needs --out FILE.jsonl (where to write the fact table's chunks)")
        from models.mtsc.knowledge import write_chunks

        write_chunks(args.out, fact_chunks(fact_table(cfg.data.seed)))
        print(f"wrote {len(fact_table(cfg.data.seed))} facts to {args.out}")
        return
    kb_path = args.kb or (Path(cfg.model.knowledge_base) if cfg.model.knowledge_base else None)
    if kb_path is None:
        fail("no knowledge-base file: give --kb FILE or set model.knowledge_base")
    if args.action == "add" and args.chunks is None:
        fail(f"{args.action} needs --chunks FILE.jsonl (one {{\"id\", \"text\"}} per line)")
    if args.action == "remove" and not args.ids:
        fail("remove needs --ids ID [ID ...] (`search` shows the ids)")
    if args.action == "search" and not args.text:
        fail('search needs the text to search for, e.g. "what does the red circle mean"')

    from models.mtsc.knowledge import KnowledgeBase, KnowledgeError, read_chunks
    from models.mtsc.model import key_embedder, knowledge_embedder

    embedder = key_embedder(cfg, knowledge_embedder(cfg))
    m = cfg.model
    try:
        if args.action == "rebuild" and args.chunks is not None:
            kb = KnowledgeBase.from_chunks(read_chunks(args.chunks), embedder, m.ivf_above,
                                           m.rag_nprobe)
        elif args.action == "rebuild":  # the base's own chunks, embedded anew
            kb = KnowledgeBase.load(kb_path).rebuild(embedder)
        elif args.action == "add":
            kb = KnowledgeBase.load(kb_path, embedder).add(read_chunks(args.chunks), embedder)
        elif args.action == "remove":
            kb = KnowledgeBase.load(kb_path, embedder).remove(args.ids)
        else:
            kb = KnowledgeBase.load(kb_path, embedder)
            scores, rows = kb.search(embedder.embed([args.text]), args.k)
            for score, row in zip(scores[0], rows[0]):
                print(f"{score:.3f}  {kb.ids[row]}  {kb.texts[row]}")
            return
    except KnowledgeError as err:
        fail(str(err))
    kb.save(kb_path)
    kind = "exact inner product" if len(kb) <= kb.ivf_above else "IVF"
    print(f"{kb_path}: {len(kb)} chunks, {kb.dim} dimensions, {kind} index")


if __name__ == "__main__":
    main()
