"""A prompt-only guardrail: the baseline that leaves the weights alone.

An instruction listing the forget subjects (and telling the model not to answer about them) goes before every
question, and the model is scored with the same metrics as the weight-level methods, so every table can show how
much those methods beat doing nothing to the weights.

Two placements:

* plain text (``chat_template=False``): :func:`guarded` rewrites the evaluation data so every question starts with
  the instruction; the metrics then run unchanged on it, with ``chat_template=False``.
* system message (``chat_template=True``): the metrics apply the chat template themselves (as one user message), so
  the instruction reaches them through the tokenizer: :meth:`Guardrail.chat_tokenizer` gives a copy whose template
  starts every conversation with it, and the metrics run on the unchanged data with ``chat_template=True``. (Chat
  prompts rendered in advance and scored with ``chat_template=False`` would not be the same input: that path joins
  prompt and answer with a space and adds special tokens again.)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import datasets
import jinja2

from ..requests import EditRequest, require_chat_template
from .qa import PARAPHRASED_QUESTION, QUESTION, QASet, as_qa_set

logger = logging.getLogger(__name__)

PLACEHOLDER = "{subjects}"
DEFAULT_INSTRUCTION = (
    "You must not share any information about the following: {subjects}. If a question is about any of them, "
    "reply only: I'm not able to answer that question."
)
# Fields that hold what the model is asked: TOFU-schema questions and edit-request prompts.
PROMPT_FIELDS = (QUESTION, PARAPHRASED_QUESTION, "prompt")

Data = TypeVar("Data")


def _template(tokenizer) -> str:
    """The tokenizer's chat template, or a ValueError saying why there is none to use."""
    if tokenizer is None:
        raise ValueError("a system-message guardrail renders through a chat template: pass the tokenizer")
    template = require_chat_template(tokenizer)
    if not isinstance(template, str):
        raise TypeError("the tokenizer has several named chat templates; set tokenizer.chat_template to the one "
                         "to guard")
    return template


@dataclass(frozen=True)
class Guardrail:
    """An instruction not to answer about ``subjects``, put before every question.

    ``instruction`` must contain ``{subjects}``, which is replaced by the subjects joined with ", " (duplicates
    dropped, order kept). With ``chat_template=False`` the guarded prompt is the instruction, ``separator``, then
    the question; with ``chat_template=True`` the instruction is a system message of the tokenizer's chat template.
    """

    subjects: Sequence[str]
    instruction: str = DEFAULT_INSTRUCTION
    chat_template: bool = False
    separator: str = " "

    def __post_init__(self) -> None:
        if isinstance(self.subjects, str):
            raise TypeError("subjects must be a list of subjects, not one string")
        bad = [s for s in self.subjects if not isinstance(s, str) or not s.strip()]
        if bad:  # before removing duplicates, which needs hashable subjects (a nested list failed as "unhashable")
            raise ValueError(f"subjects must be non-empty strings, got {bad!r}")
        subjects = tuple(dict.fromkeys(self.subjects))
        if not subjects:
            raise ValueError("subjects is empty: a guardrail needs at least one subject to refuse")
        if not isinstance(self.instruction, str) or PLACEHOLDER not in self.instruction:
            raise ValueError(f"instruction must contain the placeholder {PLACEHOLDER} (where the subjects go), "
                             f"got {self.instruction!r}")
        object.__setattr__(self, "subjects", subjects)

    @property
    def text(self) -> str:
        """The instruction with the subjects filled in."""
        return self.instruction.replace(PLACEHOLDER, ", ".join(self.subjects))

    def messages(self, question: str) -> list[dict[str, str]]:
        """The conversation of a system-message guardrail: the instruction as system message, then the question."""
        return [{"role": "system", "content": self.text}, {"role": "user", "content": question}]

    def apply(self, question: str, tokenizer=None) -> str:
        """The exact prompt text the guarded model is given for ``question``.

        Plain text needs no tokenizer; a system-message guardrail renders :meth:`messages` through ``tokenizer``'s
        chat template, with the generation prompt, as the metrics' ``chat_template=True`` path does.
        """
        if not self.chat_template:
            return f"{self.text}{self.separator}{question}"
        _template(tokenizer)
        return tokenizer.apply_chat_template(self.messages(question), add_generation_prompt=True, tokenize=False)

    def chat_tokenizer(self, tokenizer):
        """A copy of ``tokenizer`` whose chat template puts this guardrail's system message before every
        conversation, so metrics called with ``chat_template=True`` see it on unchanged data.

        The copy is checked to render a user message exactly as the original renders :meth:`messages` (a template
        that rejects system messages, or builds its prompt in some other way, raises a ValueError). Saved with
        ``save_pretrained``, it is the deployable form of the guardrail.
        """
        if not self.chat_template:
            raise ValueError("this guardrail is plain text (chat_template=False): evaluate guarded(data, guardrail) "
                             "instead")
        template = _template(tokenizer)
        system = json.dumps(self.text, ensure_ascii=False)  # a valid Jinja string literal
        guarded_tokenizer = copy.deepcopy(tokenizer)
        guarded_tokenizer.chat_template = (
            "{%- set messages = [{'role': 'system', 'content': " + system + "}] + messages -%}" + template
        )
        probe = "Who is it?"
        try:
            expected = self.apply(probe, tokenizer)
        except jinja2.TemplateError as error:  # e.g. raise_exception("System role not supported")
            raise ValueError(f"the tokenizer's chat template cannot render a system message: {error}") from error
        rendered = guarded_tokenizer.apply_chat_template(
            [{"role": "user", "content": probe}], add_generation_prompt=True, tokenize=False
        )
        if rendered != expected:
            raise ValueError("could not put the guardrail into this chat template: the guarded template renders "
                             f"{rendered!r} instead of {expected!r}")
        return guarded_tokenizer


def _guard_text(guardrail: Guardrail, text: Any, index: int, name: str) -> str:
    """``text`` guarded. A blank or missing question is refused here: guarded, it would be the instruction alone, a
    prompt the metrics score where they refuse the plain row."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"row {index}: {name} must be a non-empty string, got {text!r}")
    return guardrail.apply(text)


def _guard_mapping(row: Mapping[str, Any], guardrail: Guardrail, index: int) -> dict[str, Any]:
    # None is an optional column left empty (absent to the metrics): kept as it is.
    return {key: _guard_text(guardrail, value, index, key) if key in PROMPT_FIELDS and value is not None else value
            for key, value in row.items()}


def _guard_item(index: int, item: Any, guardrail: Guardrail) -> Any:
    if isinstance(item, EditRequest):
        # The subject stays a substring of the prompt (the instruction is only prepended); metrics do not read it.
        return dataclasses.replace(item, prompt=guardrail.apply(item.prompt))
    if isinstance(item, Mapping):
        if not any(key in item for key in PROMPT_FIELDS):
            raise ValueError(f"row {index} has none of the fields {PROMPT_FIELDS}; it has {sorted(item)}")
        return _guard_mapping(item, guardrail, index)
    if isinstance(item, Sequence) and not isinstance(item, str) and 2 <= len(item) <= 3:
        return (_guard_text(guardrail, item[0], index, "question"), *item[1:])
    raise ValueError(f"row {index} is not a (question, answer) pair, a mapping or an EditRequest: {item!r}")


def guarded(data: Data, guardrail: Guardrail) -> Data:
    """``data`` with every question (and paraphrased question, or edit prompt) guarded; answers and every other
    field unchanged, and ``data`` itself left as it is.

    Returns the same form it is given (a sequence of rows as a list), so each metric takes it as it takes
    unguarded data: a :class:`~peft_unlearn.evaluation.qa.QASet` or ``datasets.Dataset`` (``evaluate_unlearning``
    and the score functions), a list of (question, answer) pairs (also ``answer_accuracy`` and
    ``generation_match``), TOFU-style dicts, or edit requests as ``EditRequest``, dicts or tuples
    (``evaluate_editing``). Evaluate with ``chat_template=False``; a system-message guardrail goes through
    :meth:`Guardrail.chat_tokenizer` instead. ``evaluate_editing``'s locality compares two models on the same
    prompts, so for a guardrail (same weights) it is 1 by construction; what it costs unrelated questions is their
    accuracy guarded versus plain.
    """
    if guardrail.chat_template:
        raise ValueError("a system-message guardrail lives in the chat template, not in the questions: evaluate "
                         "the unchanged data with guardrail.chat_tokenizer(tokenizer) and chat_template=True")
    if isinstance(data, QASet):
        return as_qa_set([_guard_mapping(row, guardrail, index) for index, row in enumerate(data.rows)])
    if isinstance(data, datasets.Dataset):
        columns = [name for name in PROMPT_FIELDS if name in data.column_names]
        if not columns:
            raise ValueError(f"the dataset has none of the columns {PROMPT_FIELDS}; it has {data.column_names}")
        values = data.to_dict()
        for name in columns:
            values[name] = [None if value is None else _guard_text(guardrail, value, index, name)
                             for index, value in enumerate(values[name])]
        return datasets.Dataset.from_dict(values, features=data.features)
    if isinstance(data, (str, Mapping)) or not isinstance(data, Sequence):
        raise TypeError(f"cannot guard a {type(data).__name__}: give a QASet, a datasets.Dataset or a list of rows")
    if not data:
        raise ValueError("the evaluation data is empty")
    rows = [_guard_item(index, item, guardrail) for index, item in enumerate(data)]
    logger.debug("guarded %d rows with an instruction of %d characters", len(rows), len(guardrail.text))
    return rows
