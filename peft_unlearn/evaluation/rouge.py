"""ROUGE-L recall, TOFU's generation score, as an ``evaluate`` metric that works with no network.

``evaluate.load("rouge")`` fetches its script from the Hub; this module wraps ``rouge_score`` locally instead. It uses
absolute imports only, so it can also be loaded by path: ``evaluate.load(peft_unlearn.evaluation.rouge.__file__)``.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence

import datasets
import evaluate
from nltk.stem import porter
from rouge_score import rouge_scorer

# Chinese, Japanese and Korean characters (one word each: those scripts do not separate words by spaces) and runs of
# any other letters and digits.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")

_DESCRIPTION = """ROUGE-L recall of each prediction against its reference (TOFU scores greedy answers this way):
the length of their longest common subsequence of (Porter-stemmed, lower-cased) words over the reference length."""

_CITATION = """@inproceedings{lin-2004-rouge,
  title = {{ROUGE}: A Package for Automatic Evaluation of Summaries},
  author = {Lin, Chin-Yew},
  booktitle = {Text Summarization Branches Out},
  year = {2004},
}"""

_INPUTS = """
Args:
    predictions: generated texts.
    references: the expected answers, one per prediction.
Returns:
    rougeL_recall: the mean ROUGE-L recall over the pairs.
"""


class WordTokenizer:
    """rouge_score's default words (lower case, letters and digits, Porter stems of words longer than three
    characters) in every script: its default keeps only a-z and 0-9, so a verbatim answer in Cyrillic or Chinese
    scored 0 and "García" became "garc", "a". On ASCII text the words are the same."""

    def __init__(self) -> None:
        # Stemming is most of ROUGE's time and answers repeat their words: each word is stemmed once.
        self._stem = functools.lru_cache(maxsize=2**16)(porter.PorterStemmer().stem)

    def tokenize(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFKC", text).lower()  # "Zoe\u0308" and "Zoë" are one word
        return [self._stem(w) if len(w) > 3 else w for w in _WORD.findall(text)]


@functools.lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=WordTokenizer())


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each prediction against its reference, with stemming as in TOFU's evaluation."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return [_scorer().score(ref, prediction)["rougeL"].recall for prediction, ref in zip(predictions, references)]


class RougeLRecall(evaluate.Metric):
    """``evaluate`` metric object for ROUGE-L recall: ``RougeLRecall().compute(predictions=..., references=...)``."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        if not predictions:
            raise ValueError("no predictions to score")
        scores = rouge_l_recall(predictions, references)
        return {"rougeL_recall": sum(scores) / len(scores)}
