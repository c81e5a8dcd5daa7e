"""Retrieval at the mtsc receiver: the knowledge base, its file, and that answers follow
what is retrieved (and change when the facts are rewritten, with no training step)."""

import numpy as np
import pytest
import torch

from common.config import ConfigError, load_config
from common.data import load_partition
from common.data.facts import MEANING_ANSWER0, MEANINGS, fact_chunks, fact_table
from common.data.tensor_dataset import TensorDictDataset
from models.mtsc import model as mtsc_model
from models.mtsc import workload as mtsc
from models.mtsc.knowledge import KnowledgeBase, KnowledgeError, read_chunks, write_chunks
from reports import knowledge as knowledge_cli
from reports.rag import relabel, rewritten

TINY_RAG = ["data.questions=knowledge", "model.rag_k=4", "model.rag_chunk_len=8",
            "data.num_samples=600", "data.partitioner=iid", "train.local_epochs=1",
            "train.batch_size=32", "train.lr=0.005", "model.tasks=[vqa]", "data.image_size=16",
            "model.d_model=32", "model.layers=1", "model.heads=2", "model.ffn_dim=64"]


def _cfg(*extra):
    return load_config("configs/quickstart.yaml", TINY_RAG + list(extra))


@pytest.fixture(scope="module")
def trained():
    """A tiny receiver trained with retrieval on counterfactual fact tables."""
    torch.manual_seed(0)
    cfg = _cfg()
    train, test = load_partition(cfg.data, 0, 1, cfg.model.caption_len)
    model = mtsc.build(cfg)
    for epoch in range(16):
        mtsc.train_local(model, train, cfg, seed=epoch)
    return cfg, model, test


def _accuracy(model, data, cfg, k):
    model.receiver.retriever.k = k
    try:
        return mtsc.evaluate(model, data, cfg)["vqa_accuracy"]
    finally:
        model.receiver.retriever.k = cfg.model.rag_k


def test_knowledge_questions_are_answered_by_retrieval_and_guessed_without_it(trained):
    cfg, model, test = trained
    chance = 1 / len(MEANINGS)
    assert _accuracy(model, test, cfg, 0) < chance + 0.2  # the fact is not in the image
    for k in (1, 4):
        assert _accuracy(model, test, cfg, k) > 0.75, k


def test_rewritten_facts_change_the_answers_without_a_training_step(trained):
    cfg, model, test = trained
    retriever = model.receiver.retriever
    old_kb, table = retriever.knowledge, fact_table(cfg.data.seed)
    new_table = rewritten(table, 12, cfg.seed)
    changed = np.flatnonzero(new_table != table)
    asked = np.flatnonzero(np.isin(test.tensors["subject"].numpy(), changed))
    on_changed = TensorDictDataset({k: v[asked] for k, v in relabel(test, new_table).tensors.items()})
    params = {n: p.clone() for n, p in model.state_dict().items()}
    embedder = retriever.key_embedder
    new_chunks = [c for s, c in enumerate(fact_chunks(new_table)) if s in set(changed.tolist())]
    try:
        before = _accuracy(model, on_changed, cfg, 4)
        retriever.knowledge = old_kb.add(new_chunks, embedder)
        after = _accuracy(model, on_changed, cfg, 4)
    finally:
        retriever.knowledge = old_kb
    assert len(asked) >= 20
    assert before < 0.2 < 0.75 < after
    assert all(torch.equal(params[n], p) for n, p in model.state_dict().items())


@torch.no_grad()
def test_answers_change_only_through_the_knowledge_base(trained):
    cfg, model, test = trained
    retriever, model_kb = model.receiver.retriever, model.receiver.retriever.knowledge
    batch = {k: v[:32] for k, v in test.tensors.items()}
    shuffled = np.random.default_rng(1).permutation(fact_table(cfg.data.seed))
    other_kb = KnowledgeBase.from_chunks(fact_chunks(shuffled), retriever.key_embedder)

    def logits(kb, k):
        retriever.knowledge, retriever.k = kb, k
        torch.manual_seed(0)
        h, _ = model(batch)
        return model.task_decoders.vqa(h[:, mtsc_model.Q_VQA])

    try:
        assert torch.equal(logits(model_kb, 0), logits(other_kb, 0))  # k = 0: no reading
        assert not torch.equal(logits(model_kb, 4), logits(other_kb, 4))
        answers = logits(other_kb, 4).argmax(-1)
        expected = MEANING_ANSWER0 + torch.from_numpy(shuffled)[batch["subject"]]
        assert (answers == expected).float().mean() > 0.75
    finally:
        retriever.knowledge, retriever.k = model_kb, cfg.model.rag_k


def test_without_retrieval_the_model_is_the_one_before_it():
    plain, rag = mtsc.build(_cfg("model.rag_k=0")), mtsc.build(_cfg())
    assert plain.receiver.retriever is None
    rag_state = rag.state_dict()
    for name, value in plain.state_dict().items():
        assert torch.equal(value, rag_state[name]), name
    extra = set(rag_state) - set(plain.state_dict())
    assert extra and all(n.startswith("receiver.retriever.") for n in extra)
    assert not any("retriever" in k for k in mtsc.shared_state(rag))  # never in a message


def test_retrieval_needs_a_knowledge_base_and_says_where_to_get_one():
    with pytest.raises(ConfigError, match="model.knowledge_base"):
        load_config("configs/quickstart.yaml", ["model.rag_k=4"])
    with pytest.raises(ConfigError, match="data.questions"):
        load_config("configs/quickstart.yaml", ["data.name=digits", "data.questions=knowledge"])


def test_knowledge_base_file_round_trips_and_refuses_broken_or_foreign_files(tmp_path, monkeypatch):
    cfg = _cfg()
    embedder = mtsc_model.knowledge_embedder(cfg)
    kb = KnowledgeBase.from_chunks(fact_chunks(fact_table(0)), embedder)
    path = tmp_path / "kb.npz"
    kb.save(path)
    back = KnowledgeBase.load(path, embedder)
    assert back.ids == kb.ids and back.texts == kb.texts
    q = embedder.embed(["what does the red circle mean"])
    assert np.array_equal(back.search(q, 3)[1], kb.search(q, 3)[1])
    assert "red-circle" in [back.ids[r] for r in back.search(q, 3)[1][0]]

    wider = mtsc_model.knowledge_embedder(_cfg("model.d_model=64", "model.heads=4"))
    with pytest.raises(KnowledgeError, match="32 dimensions.*64 dimensions.*rebuild"):
        KnowledgeBase.load(path, wider)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(path.read_bytes()[:200])
    with pytest.raises(KnowledgeError, match="not a readable knowledge base.*rebuild"):
        KnowledgeBase.load(broken, embedder)
    with pytest.raises(KnowledgeError, match="does not exist"):
        KnowledgeBase.load(tmp_path / "none.npz", embedder)

    # A write that fails half-way leaves the old file whole and no temporary behind.
    original = path.read_bytes()

    def half_a_write(f, **arrays):
        f.write(b"PK\x03\x04 half")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", half_a_write)
    with pytest.raises(OSError, match="disk full"):
        kb.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.npz", "kb.npz"]


def test_above_ivf_above_the_index_is_inverted_and_finds_the_exact_neighbours():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2000, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = [f"c{i}" for i in range(len(emb))]
    flat = KnowledgeBase(ids, ids, emb, "test", ivf_above=10_000)
    ivf = KnowledgeBase(ids, ids, emb, "test", ivf_above=1000, nprobe=8)
    assert type(flat.index).__name__ == "IndexFlatIP"
    assert type(ivf.index).__name__ == "IndexIVFFlat"
    queries = emb[:200] + 0.05 * rng.normal(size=(200, 16)).astype(np.float32)
    exact, approx = flat.search(queries, 1)[1], ivf.search(queries, 1)[1]
    assert np.array_equal(exact[:, 0], np.arange(200))
    assert (approx == exact).mean() > 0.9


def test_chunk_files_with_bad_lines_name_the_line(tmp_path):
    path = tmp_path / "chunks.jsonl"
    path.write_text('{"id": "a", "text": "the red circle means apple"}\nnot json\n')
    with pytest.raises(KnowledgeError, match=r"chunks.jsonl:2: not JSON"):
        read_chunks(path)
    path.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(KnowledgeError, match=r"\['a'\] appear more than once"):
        read_chunks(path)
    path.write_text('{"id": "a"}\n')
    with pytest.raises(KnowledgeError, match='chunks.jsonl:1: .*"text"'):
        read_chunks(path)


def test_the_command_line_rebuilds_adds_removes_and_searches(tmp_path, capsys):
    kb, facts = tmp_path / "kb.npz", tmp_path / "facts.jsonl"
    common = ["--config", "configs/quickstart.yaml", "--kb", str(kb), "--set", *TINY_RAG]
    knowledge_cli.main(["facts", "--out", str(facts), *common])
    knowledge_cli.main(["rebuild", "--chunks", str(facts), *common])
    assert "24 chunks" in capsys.readouterr().out
    write_chunks(tmp_path / "new.jsonl", [{"id": "red-circle", "text": "the red circle means violin"},
                                          {"id": "note", "text": "violin"}])
    knowledge_cli.main(["add", "--chunks", str(tmp_path / "new.jsonl"), *common])
    assert "25 chunks" in capsys.readouterr().out
    knowledge_cli.main(["search", "what does the red circle mean", "-k", "1", *common])
    assert "the red circle means violin" in capsys.readouterr().out
    knowledge_cli.main(["remove", "--ids", "note", *common])
    assert "24 chunks" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        knowledge_cli.main(["remove", "--ids", "nope", *common])
    assert "not in the knowledge base" in capsys.readouterr().err
