"""Evaluation rows in the TOFU schema, from whichever form a caller holds them in.

Every metric reads its data through :func:`as_qa_set`, so which optional columns a set has (and so which metrics
can be computed on it) is decided in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import datasets

QUESTION = "question"
ANSWER = "answer"
PARAPHRASED_ANSWER = "paraphrased_answer"
PERTURBED_ANSWER = "perturbed_answer"
PARAPHRASED_QUESTION = "paraphrased_question"
OPTIONAL_COLUMNS = (PARAPHRASED_ANSWER, PERTURBED_ANSWER, PARAPHRASED_QUESTION)

QAData = Union["QASet", datasets.Dataset, Sequence[Mapping[str, Any]], Sequence[tuple[str, str]]]


@dataclass(frozen=True)
class QASet:
    """Question/answer rows; ``perturbed_answer`` is always a tuple of strings when present.

    An optional column counts only if every row has it: a partly filled column is an error, not a smaller set.
    """

    rows: tuple[dict[str, Any], ...]
    columns: frozenset[str]

    def __len__(self) -> int:
        return len(self.rows)

    def has(self, column: str) -> bool:
        return column in self.columns

    def column(self, name: str) -> list:
        if not self.has(name):
            raise KeyError(f"the set has no {name!r} column; it has {sorted(self.columns)}")
        return [row[name] for row in self.rows]

    @property
    def questions(self) -> list[str]:
        return self.column(QUESTION)

    @property
    def answers(self) -> list[str]:
        return self.column(ANSWER)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.questions, self.answers))


def _row(index: int, item: Any) -> dict[str, Any]:
    if isinstance(item, Mapping):
        missing = [name for name in (QUESTION, ANSWER) if name not in item]
        if missing:
            raise ValueError(f"row {index} lacks {missing}; it has {sorted(item)}")
        # An optional column left null is absent; a null question or answer is kept, to be refused below.
        row = {QUESTION: item[QUESTION], ANSWER: item[ANSWER]}
        row.update({name: item[name] for name in OPTIONAL_COLUMNS if item.get(name) is not None})
    elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
        row = {QUESTION: item[0], ANSWER: item[1]}
    else:
        raise ValueError(f"row {index} is neither a mapping with question/answer nor a (question, answer) pair: "
                         f"{item!r}")
    for name in (QUESTION, ANSWER, PARAPHRASED_ANSWER, PARAPHRASED_QUESTION):
        if name in row and not (isinstance(row[name], str) and row[name].strip()):
            raise ValueError(f"row {index}: {name} must be a non-empty string, got {row[name]!r}")
    if PERTURBED_ANSWER in row:
        perturbed = row[PERTURBED_ANSWER]
        perturbed = (perturbed,) if isinstance(perturbed, str) else tuple(perturbed)
        if not perturbed or not all(isinstance(p, str) and p.strip() for p in perturbed):
            raise ValueError(f"row {index}: perturbed_answer must hold non-empty strings, got {perturbed!r}")
        row[PERTURBED_ANSWER] = perturbed
    return row


def as_qa_set(data: QAData) -> QASet:
    """Rows from a ``datasets.Dataset``, a list of dicts in the TOFU schema, or (question, answer) tuples."""
    if isinstance(data, QASet):
        return data
    if isinstance(data, datasets.Dataset):
        data = data.to_list()
    rows = tuple(_row(i, item) for i, item in enumerate(data))
    if not rows:
        raise ValueError("the evaluation set is empty")
    columns = {QUESTION, ANSWER}
    for name in OPTIONAL_COLUMNS:
        count = sum(name in row for row in rows)
        if count == len(rows):
            columns.add(name)
        elif count:
            raise ValueError(f"{count} of {len(rows)} rows have {name!r}: give it for every row or for none")
    return QASet(rows, frozenset(columns))
