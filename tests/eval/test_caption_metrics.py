"""Caption metrics: hand-computed values, parity with pycocoevalcap (where installed), METEOR or its absence."""

from __future__ import annotations

import contextlib
import io
import math
import random
import shutil

import pytest

from data_pipelines.shapes import ShapesConfig, ShapesWorld
from eval import caption_metrics as cm
from eval.caption_metrics import (
    attribute_accuracy,
    bleu,
    caption_metrics,
    cider_d,
    meteor_unavailable,
    rouge_l,
    tokenize,
)


def test_tokenize_like_coco_ptb():
    assert tokenize("A large red circle, in the top left.") == "a large red circle in the top left".split()
    assert tokenize("There's a dog's ball; it isn't RED!") == ["there", "'s", "a", "dog", "'s", "ball", "it", "is",
                                                              "n't", "red"]
    assert tokenize('A black-and-white (3.5) "cat"') == ["a", "black-and-white", "-lrb-", "3.5", "-rrb-", "cat"]
    assert tokenize("  ") == []


def test_bleu_by_hand():
    b = bleu([["a", "b", "c", "d"]], [[["a", "b", "c", "e"]]])
    assert b[0] == pytest.approx(3 / 4)
    assert b[1] == pytest.approx(math.sqrt(3 / 4 * 2 / 3))
    assert b[2] == pytest.approx((3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3))
    assert b[3] < 1e-3  # no 4-gram matches
    # Brevity penalty against the closest reference length (4, not 2): exp(1 - 4/2).
    short = bleu([["a", "b"]], [[["a", "b", "c", "d"], ["x", "y", "z", "w", "v", "u"]]])
    assert short[0] == pytest.approx(math.exp(-1))
    # Clipping: a repeated word counts as often as the reference has it.
    assert bleu([["a", "a", "a", "a"]], [[["a", "b", "c", "d"]]])[0] == pytest.approx(1 / 4)


def test_rouge_l_by_hand():
    assert rouge_l([["a", "b", "c", "d"]], [[["a", "c", "d", "e"]]]) == pytest.approx(0.75)
    # Best precision and best recall over the references are taken separately (coco-caption's choice).
    p, r, beta = 2 / 2, 2 / 3, 1.2
    want = (1 + beta**2) * p * r / (r + beta**2 * p)
    assert rouge_l([["a", "b"]], [[["a", "b", "x"], ["a", "y", "z", "b", "w"]]]) == pytest.approx(want)
    assert rouge_l([[]], [[["a"]]]) == 0.0


def test_cider_d_rewards_the_right_caption_and_not_repetition():
    refs = [[["a", "red", "circle", "top", "left"]], [["a", "blue", "square", "above", "a", "green", "triangle"]]]
    assert cider_d([r[0] for r in refs], refs) == pytest.approx(10.0)  # each equals its only reference
    # A two-token caption has no 3- or 4-grams: half of its n-gram similarities are 0 (10 → 5).
    assert cider_d([["red", "circle"], refs[1][0]], [[["red", "circle"]], refs[1]]) == pytest.approx((5 + 10) / 2)
    one_wrong = cider_d([refs[0][0], ["a", "blue", "square", "below", "a", "green", "triangle"]], refs)
    assert 0 < one_wrong < 10
    # Saying the right words twice does not pay (clipped counts, length penalty).
    repeated = cider_d([["a", "red", "circle", "top", "left", "red", "circle", "top", "left"], refs[1][0]], refs)
    assert repeated < 9


def _random_corpus(seed: int, n: int = 40):
    rng = random.Random(seed)
    vocab = "a the red blue small large circle square triangle left of right above below in top".split()
    hyps = [[rng.choice(vocab) for _ in range(rng.randint(1, 12))] for _ in range(n)]
    refs = [[[rng.choice(vocab) for _ in range(rng.randint(3, 12))] for _ in range(rng.randint(1, 4))]
            for _ in range(n)]
    return hyps, refs


@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_pycocoevalcap(seed):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    hyps, refs = _random_corpus(seed)
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap's BLEU prints its counts
        want_bleu, _ = Bleu(4).compute_score(gts, res)
    assert bleu(hyps, refs) == pytest.approx(want_bleu, rel=1e-9, abs=1e-12)
    assert cider_d(hyps, refs) == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-9)
    assert rouge_l(hyps, refs) == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-9)


def test_tokenizer_parity_with_the_java_ptb_tokenizer():
    pytest.importorskip("pycocoevalcap")
    if shutil.which("java") is None:
        pytest.skip("no java")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    sentences = ["A large red circle in the top left.", "a small, blue square left of a big yellow triangle",
                 "There's a dog's ball; it isn't RED!", "A black-and-white photo of 3.5 cats (two sleeping).",
                 "  Two  people -- one with a hat -- at 5 o'clock?", 'He said "hello" to the man\'s wife.',
                 "Don't you see them? They're here, we'll go."]
    with contextlib.redirect_stderr(io.StringIO()):
        out = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
    for i, s in enumerate(sentences):
        assert tokenize(s) == out[i][0].split(), s


def test_caption_metrics_perfect_and_wrong():
    recs = list(ShapesWorld(ShapesConfig()).generate("test", 20))
    refs = [[r.text, *r.paraphrases] for r in recs]
    perfect = caption_metrics([r.text for r in recs], refs, with_meteor=False)
    assert perfect["n"] == 20 and perfect["METEOR"] is None and perfect["absent"] == {"METEOR": "not requested"}
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert perfect[k] == pytest.approx(1.0)
    assert perfect["CIDEr"] > 5
    wrong = caption_metrics(["a small green square in the center"] * 20, refs, with_meteor=False)
    assert wrong["BLEU-4"] < 0.5 and wrong["CIDEr"] < 2 and wrong["ROUGE-L"] < perfect["ROUGE-L"]
    with pytest.raises(ValueError):
        caption_metrics(["x"], [])


def test_meteor_absent_without_java(monkeypatch):
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    assert "Java" in meteor_unavailable()
    out = caption_metrics(["a red circle"], [["a red circle"]])
    assert out["METEOR"] is None and "Java" in out["absent"]["METEOR"]


def test_meteor_runs_where_java_is():
    if meteor_unavailable() is not None:
        pytest.skip(meteor_unavailable())
    refs = [["a large red circle in the top left", "a big red disc at the top left"],
            ["a small blue square left of a large yellow triangle"]]
    corpus, (good, bad) = cm.meteor(["a large red circle in the top left", "a small green square in the center"],
                                    refs)
    assert 0.9 < good <= 1.0 and bad < 0.5 and bad < corpus < good


def test_attribute_accuracy_counts_half_right_as_half():
    recs = list(ShapesWorld(ShapesConfig()).generate("test", 40))
    preds = [r.paraphrases[0] if i % 2 == 0 else "a large purple triangle in the bottom right" for i, r in
             enumerate(recs)]
    # the wrong caption is right by chance only if the scene is exactly that one
    lucky = sum(1 for i, r in enumerate(recs) if i % 2 and r.text == preds[i])
    acc = attribute_accuracy(preds, [r.attributes for r in recs])
    assert acc["accuracy"]["strict"] == pytest.approx((20 + lucky) / 40)
    assert len(acc["per_caption"]) == 40 and acc["accuracy"]["parsed"] == 1.0
