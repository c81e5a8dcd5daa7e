"""The paper's text metrics of the `mtsc` workload: CIDEr-D for captions (pycocoevalcap's
scorer on our own word tokens) and BLEU for VQA answers (models/mtsc/metrics.py)."""

import math
from collections import Counter

import pytest
import torch
from pycocoevalcap.cider.cider import Cider
from torch.utils.data import default_collate

from common.config import load_config
from models.mtsc import workload as mtsc
from models.mtsc.metrics import TaskScorer, cider, vqa_bleu

# A fixed corpus: four images, one or two references each (words of the synthetic
# scenes' vocabulary), hypotheses good, partial, repetitive and too long.
REFS = [["a red circle left of a blue square", "a red circle and a blue square"],
        ["two green triangles"],
        ["a yellow square above a red triangle"],
        ["one blue circle", "a blue circle"]]
HYPS = ["a red circle left of a blue square", "two green green green triangles",
        "a yellow square", "a blue circle on the left of a big red square"]


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def cider_d_by_the_formula(hyps, refs, n_max=4, sigma=6.0):
    """CIDEr-D as Vedantam et al. (CVPR 2015, Sec. 8) define it, written out here:
    TF-IDF n-gram vectors (IDF from the references: log(N / df)), the hypothesis'
    weights clipped at the reference's, a Gaussian penalty on the length difference,
    the mean over n = 1..4 and references, times 10."""
    n_images = len(refs)
    df = Counter(g for rs in refs for g in {g for r in rs for n in range(1, n_max + 1)
                                            for g in _ngrams(r.split(), n)})

    def vector(words, n):
        return {g: tf * (math.log(n_images) - math.log(max(1.0, df[g])))
                for g, tf in _ngrams(words, n).items()}

    scores = []
    for hyp, rs in zip(hyps, refs):
        h_words, total = hyp.split(), 0.0
        for ref in rs:
            r_words = ref.split()
            penalty = math.exp(-((len(h_words) - len(r_words)) ** 2) / (2 * sigma ** 2))
            for n in range(1, n_max + 1):
                g, r = vector(h_words, n), vector(r_words, n)
                norm = math.sqrt(sum(v * v for v in g.values())) * math.sqrt(
                    sum(v * v for v in r.values()))
                dot = sum(min(v, r.get(k, 0.0)) * r.get(k, 0.0) for k, v in g.items())
                total += penalty * (dot / norm if norm else 0.0) / n_max
        scores.append(10.0 * total / len(rs))
    return sum(scores) / len(scores)


def test_cider_matches_pycocoevalcap_and_the_cider_d_formula_on_a_fixed_example():
    ours = cider(HYPS, REFS)
    theirs, _ = Cider().compute_score({i: r for i, r in enumerate(REFS)},
                                      {i: [h] for i, h in enumerate(HYPS)})
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours == pytest.approx(cider_d_by_the_formula(HYPS, REFS), rel=1e-9)
    assert ours == pytest.approx(3.32384, abs=1e-5)  # the value itself, pinned


def test_cider_d_clips_repeats_penalises_length_and_gives_10_to_exact_captions():
    exact = ["a big red circle", "two small green triangles", "one blue square left"]
    refs = [[r] for r in exact]
    assert cider(exact, refs) == pytest.approx(10.0)  # 4 words: every n-gram order counts
    # Repeating a reference word cannot buy score (the clipping of CIDEr-D) ...
    repeated = ["a big red red red circle", *exact[1:]]
    assert cider(repeated, refs) < cider(exact, refs)
    # ... and the length penalty: the same n-grams in a longer caption score less.
    longer = ["a big red circle a big red circle", *exact[1:]]
    assert cider(longer, refs) < cider(exact, refs)


def test_cider_idf_is_the_corpus_s_so_batches_must_not_be_scored_alone():
    whole = cider(HYPS, REFS)
    per_batch = (cider(HYPS[:2], REFS[:2]) + cider(HYPS[2:], REFS[2:])) / 2
    assert abs(whole - per_batch) > 0.1


def test_cider_of_a_corpus_without_reference_words_is_zero_and_lengths_must_agree():
    assert cider(["a"], [[""]]) == 0.0
    with pytest.raises(ValueError, match="one list of references per hypothesis"):
        cider(["a", "b"], [["a"]])


def test_vqa_bleu_is_unigram_bleu_and_the_accuracy_on_one_word_answers():
    assert vqa_bleu(["red", "two", "yes", "no"], ["red", "three", "yes", "yes"]) == \
        pytest.approx(0.5)
    # Two words, both predicted and true: 2 of 3 predicted words match, equal lengths.
    assert vqa_bleu(["red", "two cubes"], ["red", "two spheres"]) == pytest.approx(2 / 3)


def test_task_scorer_scores_the_whole_test_set_as_one_corpus():
    cfg = load_config("configs/quickstart.yaml", [
        "num_clients=2", "data.num_samples=200", "model.tasks=[vqa,captioning]"])
    model = mtsc.build(cfg).eval()
    _, test = mtsc.load_data(cfg, 0, cfg.num_clients)
    items = [test[i] for i in range(16)]
    scorer = TaskScorer(cfg)
    with torch.no_grad():
        for part in (items[:8], items[8:]):
            batch = default_collate(part)
            h, _ = model(batch, torch.full((8,), 10.0))
            scorer.add(model.task_decoders, h, batch)
    out = scorer.result()
    assert len(scorer.hyps) == 16
    assert out["cider"] == pytest.approx(cider(scorer.hyps, scorer.refs))
    assert out["vqa_bleu"] == pytest.approx(out["vqa_accuracy"])  # one-word answers
    assert set(mtsc.EVAL_METRICS) >= {"cider", "vqa_bleu", "bleu", "vqa_accuracy"}
