"""Evaluation: TOFU unlearning metrics, editing metrics, reports and the trade-off plot.

Everything is batched and runs without gradients; ROUGE is computed locally (no Hub download).
"""

from .edit_metrics import edit_success, evaluate_editing, locality
from .guardrail import DEFAULT_INSTRUCTION, Guardrail, guarded
from .plot import plot_tradeoff
from .qa import QASet, as_qa_set
from .report import EvaluationReport
from .rouge import RougeLRecall, rouge_l_recall
from .scores import (
    AnswerScores,
    answer_probability,
    answer_scores,
    extraction_strength,
    refusal_rate,
    rouge_l,
    true_answer_probability,
    truth_ratio,
)
from .tofu import (
    forget_quality,
    model_utility,
    true_answer_probabilities,
    truth_ratio_score,
    truth_ratios_from_nll,
)
from .unlearning import evaluate_unlearning

__all__ = [
    "DEFAULT_INSTRUCTION",
    "AnswerScores",
    "EvaluationReport",
    "Guardrail",
    "QASet",
    "RougeLRecall",
    "answer_probability",
    "answer_scores",
    "as_qa_set",
    "edit_success",
    "evaluate_editing",
    "evaluate_unlearning",
    "extraction_strength",
    "forget_quality",
    "guarded",
    "locality",
    "model_utility",
    "plot_tradeoff",
    "refusal_rate",
    "rouge_l",
    "rouge_l_recall",
    "true_answer_probabilities",
    "true_answer_probability",
    "truth_ratio",
    "truth_ratio_score",
    "truth_ratios_from_nll",
]
