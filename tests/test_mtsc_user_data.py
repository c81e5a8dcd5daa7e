"""The mtsc workload on users' data: a federated round of all four tasks on an image
folder and on a parquet dataset (tests/user_data.py), classification and reconstruction
on scikit-image's photos, and a clear refusal of a task whose annotation the source
lacks."""

import math

import pytest
from test_server_rounds import LoopbackGrid

from common.config import load_config
from common.data import DataError, text_vocab
from fl_server.rounds import run_federated
from models.mtsc import metrics as mtsc_metrics
from models.mtsc import workload as mtsc

ALL_TASKS = "model.tasks=[classification, vqa, captioning, reconstruction]"


def small_cfg(*overrides):
    """One round of two clients on ~40 examples, the quickstart's tiny LAM."""
    return load_config("configs/quickstart.yaml", [
        "num_clients=2", "min_train_clients=2", "rounds=1", "data.num_samples=40",
        "data.partitioner=iid", "train.local_epochs=1", "train.batch_size=8",
        *overrides])


@pytest.fixture
def captions_seen(monkeypatch):
    """The (generated, reference) captions of every evaluation in the test."""
    seen = []
    result = mtsc_metrics.TaskScorer.result

    def keep(self):
        seen.extend(zip(self.hyps, self.refs))
        return result(self)

    monkeypatch.setattr(mtsc_metrics.TaskScorer, "result", keep)
    return seen


def finite(row, keys):
    for k in keys:
        assert k in row, f"{k} missing from the round's row {sorted(row)}"
        assert math.isfinite(row[k]), f"{k} = {row[k]}"


@pytest.mark.parametrize("source", ["user_folder", "user_parquet"])
def test_a_round_of_all_four_tasks_on_user_data(source, request, tmp_path, captions_seen,
                                                flower_message_context):
    cfg = small_cfg(*request.getfixturevalue(source), ALL_TASKS)
    results = run_federated(LoopbackGrid(2), cfg, tmp_path / "run")
    (row,) = results["rounds"]
    assert row["clients_accepted"] == 2
    finite(row, ("train_loss", "symbols_per_example", "eval_loss", "accuracy",
                 "vqa_accuracy", "bleu", "psnr", "majority_class_share"))
    assert 0 <= row["bleu"] <= 1 and 0 <= row["vqa_accuracy"] <= 1

    vocab = text_vocab(cfg.data)
    assert captions_seen, "the evaluation should have generated captions"
    known = set(vocab.words)
    for hyp, (ref,) in captions_seen:
        assert set(hyp.split()) <= known, hyp
        assert ref.split() and set(ref.split()) <= known - {"<unk>"}, ref
    # The references are the source's own captions, decoded back from their tokens.
    model = mtsc.build(cfg)
    _, test = mtsc.load_data(cfg, 0, 2)
    assert model.task_decoders.captioning.out.out_features == len(vocab.words)
    assert model.task_decoders.vqa.out_features == len(vocab.answers)
    assert test.tensors["question"].shape[1] == vocab.question_len
    decoded = [vocab.decode(c) for c in test.tensors["caption"]]
    assert all(set(d.split()) <= known - {"<unk>"} for d in decoded)
    assert any(ref == decoded[0] for _, (ref,) in captions_seen)


def test_a_split_round_on_a_user_folder_reads_its_labels(user_folder, tmp_path, captions_seen,
                                                        flower_message_context):
    """Split training (models/mtsc/split.py) with label DP and the label-leakage audit,
    which read the source's classes (fl_client/split_handlers.py, fl_server/split_loop.py)."""
    cfg = small_cfg(*user_folder, ALL_TASKS, "split.mode=parallel", "split.steps_per_round=2",
                    "privacy.label_leakage.audit=true",
                    "privacy.split_defence.label_epsilon=2.0")
    (row,) = run_federated(LoopbackGrid(2), cfg, tmp_path / "run")["rounds"]
    assert row["clients_accepted"] == 2 and row["split_steps"] == 4
    finite(row, ("train_loss", "eval_loss", "accuracy", "vqa_accuracy", "bleu", "psnr",
                 "leak_norm_auc"))
    known = set(text_vocab(cfg.data).words)
    assert captions_seen and all(set(h.split()) <= known for h, _ in captions_seen)


def test_a_round_of_classification_and_reconstruction_on_photos(tmp_path,
                                                               flower_message_context):
    cfg = small_cfg("data.name=photos", "model.tasks=[classification, reconstruction]")
    results = run_federated(LoopbackGrid(2), cfg, tmp_path / "run")
    (row,) = results["rounds"]
    assert row["clients_accepted"] == 2
    finite(row, ("train_loss", "eval_loss", "accuracy", "psnr", "majority_class_share"))
    assert "bleu" not in row and "vqa_accuracy" not in row


@pytest.mark.parametrize("tasks, column", [
    ("[captioning]", "caption"),
    ("[reconstruction, vqa]", "question"),
])
def test_a_source_without_the_texts_refuses_the_task(tasks, column):
    cfg = small_cfg("data.name=photos", f"model.tasks={tasks}")  # the config allows it
    task = tasks.strip("[]").split(", ")[-1]
    for call in (lambda: mtsc.load_data(cfg, 0, 2), lambda: mtsc.build(cfg)):
        with pytest.raises(DataError) as err:
            call()
        message = str(err.value)
        assert repr(task) in message and column in message and "photos" in message
        assert "metadata.jsonl" in message  # how to add it


def test_the_synthetic_vocabulary_sizes_the_model_as_before(tiny_cfg):
    from common.data.scenes import ANSWERS, QUESTION_LEN, VOCAB

    model = mtsc.build(tiny_cfg)
    heads = model.task_decoders
    assert model.transmitter.text_embedding.num_embeddings == len(VOCAB)
    assert heads.captioning.out.out_features == len(VOCAB)
    assert heads.vqa.out_features == len(ANSWERS)
    assert text_vocab(tiny_cfg.data).question_len == QUESTION_LEN


def test_an_unlabelled_source_trains_the_other_tasks(tmp_path):
    """Without a label column only classification is refused; the rest train (the
    classification head, never used, gets one output)."""
    import datasets

    from tests.user_data import parquet_overrides, scene_records

    rows = scene_records(24)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features},
                                    features=features)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    source = parquet_overrides(tmp_path / "train.parquet")
    cfg = small_cfg(*source, "model.tasks=[captioning, reconstruction]")
    train, test = mtsc.load_data(cfg, 0, 2)
    model = mtsc.build(cfg)
    trained = mtsc.train_local(model, train, cfg, seed=0)
    scored = mtsc.evaluate(model, test, cfg)
    finite({**trained, **scored}, ("loss_captioning", "loss_reconstruction", "bleu", "psnr"))
    assert "majority_class_share" not in scored
    with pytest.raises(DataError, match="'classification' needs label"):
        mtsc.load_data(small_cfg(*source, "model.tasks=[classification]"), 0, 2)
