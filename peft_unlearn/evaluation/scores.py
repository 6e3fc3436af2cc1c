"""Per-sample scores a model earns on question/answer data, batched and without gradients.

Teacher-forced scores (answer NLL, token accuracy, extraction strength) come from one forward pass per batch of
:func:`~peft_unlearn.requests.tokenize_pairs` rows; generation-based ones (ROUGE-L, refusals) from one batched
greedy generation per set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..capture import context_length
from ..data.refusals import extra_phrase_tuple, is_refusal
from ..losses import predicted_accuracy
from ..metrics import eval_mode, generate_continuations, longest_continuation, scored_batches
from ..requests import IGNORE_INDEX, answer_end_id
from . import tofu
from .qa import PARAPHRASED_ANSWER, PERTURBED_ANSWER, QAData, QASet, as_qa_set
from .rouge import rouge_l_recall

# Tokens generated past the longest expected answer, so a longer paraphrase or a refusal is seen whole.
GENERATION_MARGIN = 16


@dataclass
class AnswerScores:
    """Teacher-forced per-pair scores: mean token NLL of the answer, token accuracy, extraction strength."""

    nll: list[float]
    accuracy: list[float]
    extraction_strength: list[float]

    @property
    def probability(self) -> list[float]:
        """Per-token normalised answer probability exp(-mean NLL)."""
        return [math.exp(-nll) for nll in self.nll]


def _without_end_of_sequence(labels: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``labels`` without the appended end of sequence: each row's last scored token, where it is ``eos_id`` (a
    pair cut to the model's context ends inside its answer)."""
    scored = labels != IGNORE_INDEX
    last = torch.where(scored, torch.arange(labels.shape[1], device=labels.device), -1).max(dim=1).values
    rows = torch.arange(labels.shape[0], device=labels.device)
    ends = (last >= 0) & (labels[rows, last.clamp(min=0)] == eos_id)
    labels = labels.clone()
    labels[rows[ends], last[ends]] = IGNORE_INDEX
    return labels


def _extraction_strength(predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 - k/|y| for the smallest k such that every answer token from k on is the argmax given its true prefix
    (``predicted``: the argmax tokens, [B, T-1]).

    That argmax condition is exactly "greedy decoding from question + y[:k] reproduces y[k:]" (each greedy step
    then sees the true prefix), so one teacher-forced pass finds k for every row at once.
    """
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    wrong = (predicted != targets) & scored
    # Position of each scored token within its answer (0 = first answer token).
    position = scored.long().cumsum(dim=1) - 1
    last_wrong = torch.where(wrong, position, torch.full_like(position, -1)).max(dim=1).values
    length = scored.sum(-1)
    return 1.0 - (last_wrong + 1).float() / length.clamp(min=1).float()


def answer_scores(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 32,
    chat_template: bool = False,
    progress: bool = False,
    append_eos: bool = True,
) -> AnswerScores:
    """Score each (question, answer) pair teacher-forced, in batches of ``batch_size``.

    As in TOFU, the NLL scores the answer's tokens and the end-of-sequence token after them (``append_eos``; in
    chat format the template's end of turn; skipped for a tokenizer without one): an answer that is only the
    beginning of what the model would say does not get the full answer's probability. Accuracy and extraction
    strength read the answer's own tokens. A pair longer than the model's context is cut to it, as TOFU's
    ``max_length`` cuts: the answer's end is not scored.
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no (question, answer) pairs to score")
    end_id = answer_end_id(tokenizer, chat_template)
    append_eos = append_eos and end_id is not None
    nll, accuracy, strength = ([0.0] * len(pairs) for _ in range(3))
    scored = scored_batches(model, tokenizer, pairs, batch_size, progress, chat_template=chat_template,
                            append_eos=append_eos, max_length=context_length(model))
    with eval_mode(model):
        for rows, labels, logprobs, predicted, mask in scored:
            row_nll = -logprobs.sum(-1) / mask.sum(-1).clamp(min=1)  # sequence_nll's mean token NLL
            if append_eos:
                labels = _without_end_of_sequence(labels, end_id)
            values = zip(row_nll.tolist(), predicted_accuracy(predicted, labels).tolist(),
                         _extraction_strength(predicted, labels).tolist())
            for row, (row_nll, row_accuracy, row_strength) in zip(rows, values):
                nll[row], accuracy[row], strength[row] = row_nll, row_accuracy, row_strength
    broken = [row for row, value in enumerate(nll) if not math.isfinite(value)]
    if broken:
        # Refused rather than passed on: a NaN NLL gives NaN probabilities, and a retain-type truth ratio of
        # max(0, 1 - NaN) reads 0, which would pull model utility to 0 as if the model had lost the facts.
        raise ValueError(
            f"the model's logits are not finite on {len(broken)} of {len(pairs)} (question, answer) pairs (first: "
            f"{pairs[broken[0]][0][:80]!r}): an overflow in half precision, or NaN weights from a diverged run; "
            "evaluate in float32 or bfloat16, or check the weights"
        )
    return AnswerScores(nll, accuracy, strength)


def perturbed_nll(
    model: nn.Module,
    tokenizer,
    qa: QASet,
    *,
    batch_size: int = 32,
    chat_template: bool = False,
    progress: bool = False,
) -> list[list[float]]:
    """Mean token NLL of every perturbed answer, grouped per question (all groups scored in shared batches)."""
    groups = qa.column(PERTURBED_ANSWER)
    flat = [(question, answer) for question, group in zip(qa.questions, groups) for answer in group]
    scores = answer_scores(
        model, tokenizer, flat, batch_size=batch_size, chat_template=chat_template, progress=progress
    ).nll
    grouped, start = [], 0
    for group in groups:
        grouped.append(scores[start : start + len(group)])
        start += len(group)
    return grouped


def truth_ratio_reference(qa: QASet) -> str:
    """The column the perturbed answers are compared with: ``paraphrased_answer``, or ``answer`` when a set has no
    paraphrases (as TOFU does for real_authors and world_facts)."""
    if not qa.has(PERTURBED_ANSWER):
        raise ValueError("the set has no perturbed_answer column: its truth ratio cannot be computed")
    return PARAPHRASED_ANSWER if qa.has(PARAPHRASED_ANSWER) else "answer"


def truth_ratios(
    model: nn.Module,
    tokenizer,
    qa: QASet,
    *,
    batch_size: int = 32,
    chat_template: bool = False,
    progress: bool = False,
) -> list[float]:
    """Each question's raw truth ratio R = P(perturbed)/P(reference answer) (see :func:`truth_ratio_reference`):
    what the TOFU truth-ratio score summarises and forget quality compares."""
    reference = truth_ratio_reference(qa)
    options = dict(batch_size=batch_size, chat_template=chat_template, progress=progress)
    correct_nll = answer_scores(model, tokenizer, list(zip(qa.questions, qa.column(reference))), **options).nll
    return tofu.truth_ratios_from_nll(correct_nll, perturbed_nll(model, tokenizer, qa, **options))


def default_max_new_tokens(tokenizer, answers: Sequence[str]) -> int:
    """Room for the longest expected answer plus :data:`GENERATION_MARGIN` tokens."""
    return longest_continuation(tokenizer, answers) + GENERATION_MARGIN


def mean(values: Sequence[float]) -> float:
    """The mean of a set's per-sample scores (the set is never empty: scoring refuses empty data)."""
    return sum(values) / len(values)


def answer_probability(
    model: nn.Module,
    tokenizer,
    data: QAData,
    *,
    batch_size: int = 32,
    chat_template: bool = False,
    per_example: bool = False,
) -> float | list[float]:
    """Mean over questions of exp(-mean token NLL) of the answer given the question."""
    qa = as_qa_set(data)
    scores = answer_scores(model, tokenizer, qa.pairs, batch_size=batch_size, chat_template=chat_template)
    return scores.probability if per_example else mean(scores.probability)


def true_answer_probability(
    model: nn.Module,
    tokenizer,
    data: QAData,
    *,
    batch_size: int = 32,
    chat_template: bool = False,
    per_example: bool = False,
) -> float | list[float]:
    """Mean P_true / (P_true + sum P_perturbed): the probability score of sets with perturbed answers
    (TOFU's real_authors and world_facts)."""
    qa = as_qa_set(data)
    if not qa.has(PERTURBED_ANSWER):
        raise ValueError("the set has no perturbed_answer column: use answer_probability")
    options = dict(batch_size=batch_size, chat_template=chat_template)
    true_nll = answer_scores(model, tokenizer, qa.pairs, **options).nll
    scores = tofu.true_answer_probabilities(true_nll, perturbed_nll(model, tokenizer, qa, **options))
    return scores if per_example else mean(scores)


def truth_ratio(
    model: nn.Module,
    tokenizer,
    data: QAData,
    *,
    forget: bool,
    batch_size: int = 32,
    chat_template: bool = False,
    per_example: bool = False,
) -> float | list[float]:
    """TOFU truth ratio of a set with perturbed answers; ``per_example=True`` gives each question's raw ratio
    R = P(perturbed)/P(paraphrased) (what forget quality compares), otherwise the set score of
    :func:`~peft_unlearn.evaluation.tofu.truth_ratio_score`."""
    ratios = truth_ratios(model, tokenizer, as_qa_set(data), batch_size=batch_size, chat_template=chat_template)
    return ratios if per_example else tofu.truth_ratio_score(ratios, forget)


def extraction_strength(
    model: nn.Module,
    tokenizer,
    data: QAData,
    *,
    batch_size: int = 32,
    chat_template: bool = False,
    per_example: bool = False,
) -> float | list[float]:
    """Extraction strength (open-unlearning): ES = 1 - min k/|y| such that greedy decoding from question + y[:k]
    reproduces y[k:]; 1 means the model recites the whole answer unprompted, 0 that not even its last token comes
    out given everything before it."""
    qa = as_qa_set(data)
    scores = answer_scores(model, tokenizer, qa.pairs, batch_size=batch_size, chat_template=chat_template)
    return scores.extraction_strength if per_example else mean(scores.extraction_strength)


def rouge_l(
    model: nn.Module,
    tokenizer,
    data: QAData,
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    chat_template: bool = False,
    per_example: bool = False,
) -> float | list[float]:
    """Mean ROUGE-L recall of the greedy answer against the expected answer."""
    qa = as_qa_set(data)
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tokenizer, qa.answers)
    generated = generate_continuations(
        model, tokenizer, qa.questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
        chat_template=chat_template,
    )
    scores = rouge_l_recall(generated, qa.answers)
    return scores if per_example else mean(scores)


def refusal_rate(
    model: nn.Module,
    tokenizer,
    data: QAData,
    *,
    extra_phrases: Sequence[str] = (),
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    chat_template: bool = False,
    per_example: bool = False,
) -> float | list[float]:
    """Fraction of questions whose greedy answer is a refusal (the library's phrasings plus ``extra_phrases``);
    ``per_example=True`` gives each question's 1.0 or 0.0, as the other scores here give theirs."""
    qa = as_qa_set(data)
    extra_phrases = extra_phrase_tuple(extra_phrases)  # before generating
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tokenizer, qa.answers)
    generated = generate_continuations(
        model, tokenizer, qa.questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
        chat_template=chat_template,
    )
    scores = [float(is_refusal(text, extra_phrases)) for text in generated]
    return scores if per_example else mean(scores)
