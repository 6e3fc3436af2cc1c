"""TOFU's aggregate statistics (Maini et al. 2024; open-unlearning), computed from per-sample values.

Probabilities are per-token normalised, ``exp(-mean token NLL)``, as TOFU computes them, so answers of different
lengths compare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats

# Truth ratios are kept within exp(+-LOG_RATIO_LIMIT): a diverged model's NLL differences of thousands of nats
# would overflow a float (and their reciprocals divide by zero) without changing any score or rank.
LOG_RATIO_LIMIT = 700.0


def _check_perturbed(correct_nll: Sequence[float], perturbed_nll: Sequence[Sequence[float]]) -> None:
    if len(correct_nll) != len(perturbed_nll):
        raise ValueError(f"{len(correct_nll)} correct answers but {len(perturbed_nll)} perturbed groups")
    if any(len(group) == 0 for group in perturbed_nll):
        raise ValueError("every sample needs at least one perturbed answer")


def truth_ratios_from_nll(correct_nll: Sequence[float], perturbed_nll: Sequence[Sequence[float]]) -> list[float]:
    """Per-sample truth ratio R = P(perturbed) / P(correct), where P(perturbed) is the geometric mean over the
    perturbed answers; from mean token NLLs this is ``exp(nll_correct - mean(nll_perturbed))``."""
    _check_perturbed(correct_nll, perturbed_nll)
    return [
        math.exp(min(max(correct - sum(group) / len(group), -LOG_RATIO_LIMIT), LOG_RATIO_LIMIT))
        for correct, group in zip(correct_nll, perturbed_nll)
    ]


def truth_ratio_score(ratios: Sequence[float], forget: bool) -> float:
    """TOFU's set score: mean min(R, 1/R) on a forget set (1 when the model cannot tell true from false), mean
    max(0, 1 - R) on retain-type sets (1 when it clearly prefers the true answer)."""
    if not ratios:
        raise ValueError("no truth ratios to summarise")
    if forget:
        values = [min(r, 1.0 / r) for r in ratios]
    else:
        values = [max(0.0, 1.0 - r) for r in ratios]
    return sum(values) / len(values)


def true_answer_probabilities(true_nll: Sequence[float], perturbed_nll: Sequence[Sequence[float]]) -> list[float]:
    """Per-sample P_true / (P_true + sum P_false): TOFU's probability score on real_authors and world_facts."""
    _check_perturbed(true_nll, perturbed_nll)
    scores = []
    for true, group in zip(true_nll, perturbed_nll):
        # 1 / (1 + sum P_false / P_true), from NLL differences: exp(-nll) of a diverged model underflows to 0.
        others = sum(math.exp(min(true - nll, LOG_RATIO_LIMIT)) for nll in group)
        scores.append(1.0 / (1.0 + others))
    return scores


def forget_quality(statistic: Sequence[float], reference: Sequence[float]) -> float:
    """KS-test p-value between a per-sample statistic of the evaluated model and of the retain model on the forget
    set: high when the two distributions are indistinguishable (the model behaves as if never trained on it)."""
    if len(statistic) == 0 or len(reference) == 0:
        raise ValueError("forget quality needs per-sample values from both models")
    return float(stats.ks_2samp(list(statistic), list(reference)).pvalue)


def model_utility(scores: Sequence[float]) -> float:
    """Harmonic mean of the utility scores (TOFU: probability, ROUGE-L and truth ratio on retain, real_authors and
    world_facts); any zero score makes it zero."""
    if not scores:
        raise ValueError("no scores to combine into model utility")
    if any(s < 0 for s in scores):
        raise ValueError(f"utility scores must be non-negative, got {list(scores)}")
    return float(stats.hmean(list(scores)))
