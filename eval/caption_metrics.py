"""Caption metrics, offline: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D), plus exact Shapes attribute accuracy.

The n-gram metrics follow the coco-caption conventions (the numbers captioning papers report, and the
ones computed by ``pycocoevalcap``):

* **BLEU-n** (Papineni et al. 2002, https://aclanthology.org/P02-1040): corpus level — clipped n-gram
  matches and candidate n-grams summed over the corpus, geometric mean of the precisions up to ``n``,
  brevity penalty against the sum of each candidate's *closest* reference length (ties → shorter).
* **ROUGE-L** (Lin 2004, https://aclanthology.org/W04-1013): per caption, the longest common
  subsequence with each reference; the best precision and the best recall over the references are
  combined as F with β = 1.2; the corpus score is the mean.
* **CIDEr** is **CIDEr-D** (Vedantam et al. 2015, https://arxiv.org/abs/1411.5726, §4 — the variant
  coco-caption computes and calls "CIDEr"): TF-IDF n-gram vectors (n = 1..4, document frequency over the
  references of the evaluated corpus), candidate counts clipped by the reference's, a Gaussian length
  penalty (σ = 6), averaged over references and n, ×10.
* **METEOR** 1.5 (Denkowski & Lavie 2014, https://aclanthology.org/W14-3348) through pycocoevalcap's
  wrapper of the official jar, which runs on Java. Where Java or pycocoevalcap is missing METEOR is
  reported as absent with the reason (``absent["METEOR"]``) — never approximated: nltk's
  ``meteor_score`` needs WordNet data that cannot be downloaded at run time, and its numbers differ
  from METEOR 1.5's anyway.

Why BLEU, ROUGE-L and CIDEr-D are written here instead of imported: ``evaluate.load("bleu")`` fetches
its metric script from a hub (fails offline); pycocoevalcap's pure-Python scorers are correct but it is
a 95 MB wheel of Java jars that prints to stdout, and its tokenizer (PTBTokenizer) needs Java; rouge-score
computes sentence-level ROUGE-L with β = 1 and its own tokenizer, i.e. a different number from the
captioning one. Each function below is pinned to pycocoevalcap's value in ``tests/eval`` (where it is
installed). Tokenisation mimics coco-caption's PTBTokenizer + punctuation removal in pure Python
(:func:`tokenize`; identical on ordinary English captions, also checked against the Java tokenizer).
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from typing import Any

# Tokens coco-caption drops after PTB tokenisation. Its list spells brackets in upper case
# ("-LRB-") but compares lower-cased tokens, so brackets survive as "-lrb-" … (mimicked, not fixed).
_PUNCTUATION = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CONTRACTION = re.compile(r"(?<=[a-z])(n't)\b|(?<=[a-z])('(?:s|re|ve|ll|d|m))\b")
# A word (letters/digits, inner hyphens, dots, slashes and apostrophes kept, as PTB keeps
# "black-and-white", "3.5" and "o'clock"), a clitic split off above, or one other character.
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+(?:[-./'][a-z0-9]+)*|\.\.\.|--|\S")


def tokenize(text: str) -> list[str]:
    """Lower-case PTB-style tokens without punctuation: ``"A dog's ball, red."`` → ``[a, dog, 's, ball, red]``."""
    text = _CONTRACTION.sub(lambda m: " " + (m.group(1) or m.group(2)), text.lower().replace("\n", " "))
    return [_BRACKETS.get(t, t) for t in _TOKEN.findall(text) if t not in _PUNCTUATION]


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


# ---- BLEU -----------------------------------------------------------------------------------------

def bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
         max_n: int = 4) -> list[float]:
    """Corpus BLEU-1 … BLEU-``max_n`` of tokenised captions.

    Args:
        hypotheses: one token list per image.
        references: per image, one or more token lists.

    Returns:
        ``[BLEU-1, …, BLEU-max_n]`` in [0, 1].
    """
    tiny, small = 1e-15, 1e-9  # coco-caption's smoothing: a zero precision stays (almost) zero
    correct, guess = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_len += len(hyp)
        ref_len += min((len(r) for r in refs), key=lambda r: (abs(r - len(hyp)), r))
        for n in range(1, max_n + 1):
            max_ref: Counter = Counter()
            for r in refs:
                max_ref |= _ngrams(r, n)  # | keeps the maximum count of each n-gram over references
            counts = _ngrams(hyp, n)
            correct[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            guess[n - 1] += max(len(hyp) - n + 1, 0)
    ratio = (hyp_len + tiny) / (ref_len + small)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (correct[n] + tiny) / (guess[n] + small)
        scores.append(product ** (1 / (n + 1)) * penalty)
    return scores


# ---- ROUGE-L --------------------------------------------------------------------------------------

def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) dynamic programme, one row kept)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
            beta: float = 1.2) -> float:
    """Mean ROUGE-L F-score (best precision and best recall over each image's references, β = 1.2)."""
    total = 0.0
    for hyp, refs in zip(hypotheses, references):
        lcs = [_lcs(hyp, r) for r in refs]
        p = max((m / len(hyp) if hyp else 0.0) for m in lcs)
        r = max((m / len(ref) if ref else 0.0) for m, ref in zip(lcs, refs))
        total += (1 + beta**2) * p * r / (r + beta**2 * p) if p > 0 and r > 0 else 0.0
    return total / max(len(hypotheses), 1)


# ---- CIDEr-D --------------------------------------------------------------------------------------

def cider_d(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
            max_n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (mean over images; 0 … ≈10). Document frequencies come from the references given."""
    n_images = len(hypotheses)
    if n_images == 0:
        return 0.0
    df: Counter = Counter()
    for refs in references:
        df.update({g for r in refs for n in range(1, max_n + 1) for g in _ngrams(r, n)})
    log_n = math.log(float(n_images))

    def vectors(tokens: Sequence[str]) -> tuple[list[dict], list[float]]:
        """Per n: TF-IDF weights of the n-grams (raw counts × idf) and the vector's norm."""
        vecs, norms = [], []
        for n in range(1, max_n + 1):
            v = {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in _ngrams(tokens, n).items()}
            vecs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vecs, norms

    total = 0.0
    for hyp, refs in zip(hypotheses, references):
        hv, hn = vectors(hyp)
        per_ref = []
        for ref in refs:
            rv, rn = vectors(ref)
            penalty = math.exp(-((len(hyp) - len(ref)) ** 2) / (2 * sigma**2))
            sims = []
            for n in range(max_n):
                # "-D": the candidate's weight is clipped by the reference's, so repeating an n-gram
                # does not pay.
                dot = sum(min(w, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, w in hv[n].items())
                sims.append(dot / (hn[n] * rn[n]) * penalty if hn[n] and rn[n] else 0.0)
            per_ref.append(sum(sims) / max_n)
        total += 10.0 * sum(per_ref) / len(refs)
    return total / n_images


# ---- METEOR ---------------------------------------------------------------------------------------

def meteor_unavailable() -> str | None:
    """Why METEOR 1.5 cannot run here, or None when it can (Java on PATH and pycocoevalcap installed)."""
    if shutil.which("java") is None:
        return "METEOR 1.5 runs on Java and no `java` is on PATH"
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401  (ships the official meteor-1.5.jar)
    except ImportError:
        return "METEOR 1.5 needs the pycocoevalcap package (it ships the official jar)"
    return None


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """Corpus METEOR 1.5 of raw captions and each caption's own score (the jar normalises and tokenises
    them itself, ``-norm``; the corpus score pools the statistics, it is not the mean of the parts).

    Raises RuntimeError when it cannot run (see :func:`meteor_unavailable`) or the jar fails.
    """
    reason = meteor_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    from pycocoevalcap.meteor.meteor import Meteor

    gts = {i: [" ".join(r.split()) or "." for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(h.split()) or "."] for i, h in enumerate(hypotheses)}
    scorer = Meteor()  # starts one JVM (~5 s: it loads the paraphrase table)
    try:
        score, per_caption = scorer.compute_score(gts, res)
    except (ValueError, OSError) as e:  # the JVM died (empty line) or its pipe broke
        raise RuntimeError(f"the METEOR jar failed: {e}") from None
    return float(score), [float(s) for s in per_caption]


# ---- everything together --------------------------------------------------------------------------

def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]], *,
                    with_meteor: bool = True) -> dict[str, Any]:
    """All n-gram metrics of a corpus of captions.

    Args:
        predictions: N generated captions.
        references: N lists of reference captions (e.g. a Shapes record's canonical caption and its
            paraphrases).
        with_meteor: run METEOR (starts a JVM); when False or impossible it is listed in ``absent``.

    Returns:
        ``{"n", "BLEU-1".."BLEU-4", "METEOR" (float or None), "ROUGE-L", "CIDEr", "absent": {name: reason}}``;
        BLEU/METEOR/ROUGE-L in [0, 1], CIDEr(-D) in [0, ≈10].
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if any(len(r) == 0 for r in references):
        raise ValueError("every prediction needs at least one reference caption")
    hyps = [tokenize(p) for p in predictions]
    refs = [[tokenize(r) for r in rs] for rs in references]
    out: dict[str, Any] = {"n": len(hyps)}
    for n, score in enumerate(bleu(hyps, refs), 1):
        out[f"BLEU-{n}"] = score
    out["METEOR"] = None
    out["ROUGE-L"] = rouge_l(hyps, refs)
    out["CIDEr"] = cider_d(hyps, refs)
    absent: dict[str, str] = {}
    if not with_meteor:
        absent["METEOR"] = "not requested"
    elif hyps:
        try:
            out["METEOR"] = meteor(predictions, references)[0]
        except RuntimeError as e:
            absent["METEOR"] = str(e)
    out["absent"] = absent
    return out


def attribute_accuracy(predictions: Sequence[str], attributes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Exact attribute accuracy of Shapes captions (``shapes_scorer.score_caption`` per caption, aggregated).

    Returns :func:`eval.shapes_scorer.aggregate`'s summary plus ``per_caption`` scores.
    """
    from eval.shapes_scorer import aggregate, score_caption

    per = [score_caption(p, a) for p, a in zip(predictions, attributes, strict=True)]
    return {**aggregate(per), "per_caption": per}
