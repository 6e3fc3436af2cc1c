"""TOFU-style evaluation of an unlearned model in one call: :func:`evaluate_unlearning`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence

from torch import nn
from tqdm.auto import tqdm

from ..data.refusals import extra_phrase_tuple, is_refusal
from ..editing import check_tokenizer_matches
from ..metrics import generate_continuations
from . import tofu
from .qa import PARAPHRASED_QUESTION, PERTURBED_ANSWER, QAData, QASet, as_qa_set
from .report import EvaluationReport
from .rouge import rouge_l_recall
from .scores import (
    answer_scores,
    default_max_new_tokens,
    mean,
    perturbed_nll,
    truth_ratio_reference,
    truth_ratios,
)

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("forget_quality", "forget_quality_statistic", "model_utility", "model_utility_from", "notes")
UTILITY_METRICS = ("probability", "rouge_l", "truth_ratio")


def _evaluate_set(
    model: nn.Module,
    tokenizer,
    qa: QASet,
    name: str,
    role: str,
    *,
    options: dict,
    max_new_tokens: int | None,
    extra_phrases: tuple[str, ...],
) -> tuple[dict[str, float | None], list[str], list[float]]:
    """Metrics of one set, notes on what could not be computed, and the per-sample values forget quality compares
    (see :func:`_forget_statistic`; computed on the way, so the forget set is not scored twice); ``role`` is forget,
    retain or utility."""
    notes = []
    scores = answer_scores(model, tokenizer, qa.pairs, **options)
    perturbed = perturbed_nll(model, tokenizer, qa, **options) if qa.has(PERTURBED_ANSWER) else None
    metrics: dict[str, float | None] = {}
    if role == "utility" and perturbed is not None:
        metrics["probability"] = mean(tofu.true_answer_probabilities(scores.nll, perturbed))
    else:
        metrics["probability"] = mean(scores.probability)
        if role == "utility":
            notes.append(f"{name}: no perturbed_answer column, so probability is the plain answer probability "
                         "rather than P_true / (P_true + sum P_perturbed)")
    metrics["accuracy"] = mean(scores.accuracy)
    if qa.has(PARAPHRASED_QUESTION):
        rephrased = answer_scores(model, tokenizer, list(zip(qa.column(PARAPHRASED_QUESTION), qa.answers)), **options)
        metrics["paraphrased_question_probability"] = mean(rephrased.probability)

    # `max_new_tokens or ...` silently replaced max_new_tokens=0 with the default
    tokens = default_max_new_tokens(tokenizer, qa.answers) if max_new_tokens is None else max_new_tokens
    generated = generate_continuations(model, tokenizer, qa.questions, max_new_tokens=tokens, **options)
    metrics["rouge_l"] = mean(rouge_l_recall(generated, qa.answers))

    statistic = scores.probability
    if perturbed is None:
        metrics["truth_ratio"] = None
        notes.append(f"{name}: no perturbed_answer column, so no truth ratio")
    else:
        reference = truth_ratio_reference(qa)
        if reference == "answer":
            correct_nll = scores.nll
            notes.append(f"{name}: no paraphrased_answer column, so the truth ratio compares the perturbed answers "
                         "with the answer itself (as TOFU does for real_authors and world_facts)")
        else:
            correct_nll = answer_scores(model, tokenizer, list(zip(qa.questions, qa.column(reference))), **options).nll
        statistic = tofu.truth_ratios_from_nll(correct_nll, perturbed)
        metrics["truth_ratio"] = tofu.truth_ratio_score(statistic, forget=role == "forget")

    metrics["refusal_rate"] = mean([float(is_refusal(text, extra_phrases)) for text in generated])
    if role == "forget":
        metrics["extraction_strength"] = mean(scores.extraction_strength)
    return metrics, notes, statistic


def _forget_statistic(model: nn.Module, tokenizer, forget: QASet, options: dict) -> list[float]:
    """The per-sample values forget quality compares: truth ratios when the forget set has perturbed answers (as
    TOFU), otherwise answer probabilities."""
    if forget.has(PERTURBED_ANSWER):
        return truth_ratios(model, tokenizer, forget, **options)
    return answer_scores(model, tokenizer, forget.pairs, **options).probability


def evaluate_unlearning(
    model: nn.Module,
    tokenizer,
    forget: QAData,
    retain: QAData,
    utility_sets: Mapping[str, QAData] | None = None,
    retain_model: nn.Module | None = None,
    retain_tokenizer=None,
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    extra_phrases: Sequence[str] = (),
    chat_template: bool = False,
    progress: bool = True,
    refusal_phrases: Sequence[str] | None = None,
) -> EvaluationReport:
    """Evaluate ``model`` on a forget set, a retain set and optional utility sets (e.g. real_authors, world_facts).

    Per set: answer probability (on utility sets with perturbed answers P_true / (P_true + sum P_perturbed), as
    TOFU scores real_authors and world_facts), teacher-forced token accuracy, ROUGE-L recall of the greedy answer,
    truth ratio (when the set has perturbed answers), refusal rate (the library's refusal phrasings plus
    ``extra_phrases``, as :func:`refusal_rate` names them; ``refusal_phrases`` is its deprecated name), and on the
    forget set extraction strength. Forget quality compares the forget set's per-sample truth ratios (or, without
    perturbed answers, answer probabilities; ``forget_quality_statistic`` names the one used) with those of
    ``retain_model``, a model never trained on the forget set. Model utility is the harmonic mean of probability,
    ROUGE-L and truth ratio over every set but the forget set (``model_utility_from`` lists them). What could not be
    computed is said in ``notes``. ``max_new_tokens`` defaults, per set, to the longest answer plus a margin.
    """
    if refusal_phrases is not None:
        if extra_phrases:
            raise ValueError("give extra_phrases only: refusal_phrases is its deprecated name")
        warnings.warn("evaluate_unlearning(refusal_phrases=...) is deprecated; use extra_phrases=..., as "
                      "refusal_rate and is_refusal name it", FutureWarning, stacklevel=2)
        extra_phrases = refusal_phrases
    extra_phrases = extra_phrase_tuple(extra_phrases)
    utility_sets = dict(utility_sets or {})
    clashing = sorted(set(utility_sets) & {"forget", "retain", *SUMMARY_KEYS})
    if clashing:
        raise ValueError(f"utility set names {clashing} are reserved by the report; rename them")
    sets = {"forget": (as_qa_set(forget), "forget"), "retain": (as_qa_set(retain), "retain")}
    sets.update({name: (as_qa_set(data), "utility") for name, data in utility_sets.items()})
    check_tokenizer_matches(model, tokenizer)
    if retain_model is not None:
        check_tokenizer_matches(retain_model, retain_tokenizer or tokenizer)
    options = dict(batch_size=batch_size, chat_template=chat_template, progress=progress)

    data: dict = {}
    notes: list[str] = []
    statistics: dict[str, list[float]] = {}
    for name, (qa, role) in tqdm(sets.items(), desc="evaluating sets", disable=not progress, leave=False):
        metrics, set_notes, statistics[name] = _evaluate_set(
            model, tokenizer, qa, name, role, options=options, max_new_tokens=max_new_tokens,
            extra_phrases=extra_phrases,
        )
        logger.info("%s: %s", name, metrics)
        data[name] = metrics
        notes.extend(set_notes)

    forget_qa = sets["forget"][0]
    if retain_model is None:
        data["forget_quality"] = data["forget_quality_statistic"] = None
        notes.append("forget quality not computed: no retain_model (a model never trained on the forget set) given")
    else:
        reference = _forget_statistic(retain_model, retain_tokenizer or tokenizer, forget_qa, options)
        data["forget_quality"] = tofu.forget_quality(statistics["forget"], reference)
        if forget_qa.has(PERTURBED_ANSWER):
            data["forget_quality_statistic"] = "truth_ratio"
        else:
            data["forget_quality_statistic"] = "answer_probability"
            notes.append("forget quality compares per-sample answer probabilities: the forget set has no "
                         "perturbed_answer column, so TOFU's per-sample truth ratio cannot be computed")

    components = [
        (f"{name}.{metric}", data[name][metric])
        for name, (_, role) in sets.items()
        if role != "forget"
        for metric in UTILITY_METRICS
        if data[name][metric] is not None
    ]
    data["model_utility"] = tofu.model_utility([value for _, value in components])
    data["model_utility_from"] = [label for label, _ in components]
    data["notes"] = notes
    return EvaluationReport(data, title="unlearning evaluation")
