"""Editing metrics (EasyEdit definitions): reliability, generalization and locality.

Each is reported teacher-forced and by greedy generation, because teacher forcing overstates what an edited model
actually says (WILD, arXiv 2502.11177).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..editing import check_tokenizer_matches, peft_adapter_disabled
from ..metrics import (
    answer_accuracy,
    collapse_whitespace,
    eval_mode,
    generate_continuations,
    generation_match,
    scored_batches,
)
from ..requests import EditRequest, as_edit_requests
from .report import EvaluationReport
from .scores import default_max_new_tokens

logger = logging.getLogger(__name__)

Pairs = Sequence[EditRequest | tuple[str, str] | dict]


def _pairs(items: Pairs) -> list[tuple[str, str]]:
    requests = as_edit_requests(items)
    if not requests:
        raise ValueError("no (prompt, target) pairs to evaluate")
    return [(r.prompt, r.target) for r in requests]


def edit_success(
    model: nn.Module,
    tokenizer,
    pairs: Pairs,
    *,
    batch_size: int = 32,
    chat_template: bool = False,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Reliability when ``pairs`` are the edit requests, generalization when they are rephrasings of them:
    ``teacher_forced`` = mean target-token accuracy, ``generation`` = fraction of greedy answers that start with
    the target."""
    pairs = _pairs(pairs)
    options = dict(batch_size=batch_size, chat_template=chat_template, progress=progress)
    return {
        "teacher_forced": answer_accuracy(model, tokenizer, pairs, **options),
        "generation": generation_match(model, tokenizer, pairs, max_new_tokens=max_new_tokens, **options),
    }


def _check_reference(model: nn.Module, reference_model: nn.Module | None) -> None:
    """Refuse a ``reference_model`` that runs the evaluated model's own enabled adapter layers: ``get_peft_model``
    wraps the base model in place, so that base model is the edited model, and locality against it read 1.0
    however much the edit changed (a model without adapters may be its own reference); and refuse no reference for
    a model that is not a PeftModel (there is no adapter to disable)."""
    if reference_model is None:
        if not isinstance(model, PeftModel):
            raise ValueError("locality needs the pre-edit model: pass reference_model, or a PeftModel to disable")
        return
    edited = {id(m) for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters}
    if any(id(m) in edited for m in reference_model.modules()):
        raise ValueError(
            "reference_model holds the evaluated model's adapter layers (get_peft_model wraps the base model in "
            "place, so that base model is the edited model and locality would read 1.0): omit reference_model, and "
            "the model with its adapter disabled is the pre-edit model, or pass a separately loaded copy"
        )


@contextlib.contextmanager
def _pre_edit_model(model: nn.Module, reference_model: nn.Module | None) -> Iterator[nn.Module]:
    """The model before editing: ``reference_model`` if given, else the PeftModel ``model`` with its adapter
    disabled."""
    if reference_model is not None:
        yield reference_model
    else:
        with peft_adapter_disabled(model):
            yield model


def _argmax_answer_tokens(
    model: nn.Module, tokenizer, pairs: list[tuple[str, str]], batch_size: int, chat_template: bool,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Per pair, the teacher-forced argmax token at each answer position."""
    predictions: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    with eval_mode(model):
        for rows, _, _, argmax, scored in scored_batches(model, tokenizer, pairs, batch_size, progress,
                                                         chat_template=chat_template):
            argmax, scored = argmax.cpu(), scored.cpu()
            for i, row in enumerate(rows):
                predictions[row] = argmax[i][scored[i]]
    return predictions


def locality(
    model: nn.Module,
    tokenizer,
    unrelated: Pairs,
    *,
    reference_model: nn.Module | None = None,
    batch_size: int = 32,
    chat_template: bool = False,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Agreement with the pre-edit model on unrelated prompts: ``teacher_forced`` = mean fraction of answer
    positions whose argmax token is unchanged, ``generation`` = fraction of prompts whose greedy continuation is
    unchanged. The pre-edit model is ``reference_model`` or, for a PeftModel, the model with its adapter disabled."""
    _check_reference(model, reference_model)
    pairs = _pairs(unrelated)
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tokenizer, [answer for _, answer in pairs])
    prompts = [prompt for prompt, _ in pairs]

    def outputs(scored: nn.Module) -> tuple[list[torch.Tensor], list[str]]:
        tokens = _argmax_answer_tokens(scored, tokenizer, pairs, batch_size, chat_template, progress)
        texts = generate_continuations(
            scored, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
            chat_template=chat_template, progress=progress,
        )
        return tokens, texts

    edited_tokens, edited_texts = outputs(model)
    with _pre_edit_model(model, reference_model) as pre_edit:
        pre_tokens, pre_texts = outputs(pre_edit)
    token_agreement = [(a == b).float().mean().item() for a, b in zip(edited_tokens, pre_tokens)]
    unchanged = [collapse_whitespace(a) == collapse_whitespace(b) for a, b in zip(edited_texts, pre_texts)]
    return {
        "teacher_forced": sum(token_agreement) / len(token_agreement),
        "generation": sum(unchanged) / len(unchanged),
    }


def evaluate_editing(
    model: nn.Module,
    tokenizer,
    edits: Pairs,
    rephrases: Pairs | None = None,
    unrelated: Pairs | None = None,
    *,
    reference_model: nn.Module | None = None,
    batch_size: int = 32,
    chat_template: bool = False,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """Reliability on ``edits``, generalization on ``rephrases`` (the edits asked differently, same targets) and
    locality on ``unrelated`` prompts (with their original answers), each teacher-forced and by generation;
    ``progress`` shows bars over the batches, as :func:`evaluate_unlearning` does."""
    check_tokenizer_matches(model, tokenizer)
    if reference_model is not None:
        check_tokenizer_matches(reference_model, tokenizer)
    if unrelated is not None:
        _check_reference(model, reference_model)  # before reliability and generalization are spent
    options = dict(batch_size=batch_size, chat_template=chat_template, max_new_tokens=max_new_tokens,
                   progress=progress)
    data: dict = {"reliability": edit_success(model, tokenizer, edits, **options)}
    notes = []
    if rephrases is None:
        notes.append("generalization not computed: no rephrases given")
    else:
        data["generalization"] = edit_success(model, tokenizer, rephrases, **options)
    if unrelated is None:
        notes.append("locality not computed: no unrelated prompts given")
    else:
        data["locality"] = locality(model, tokenizer, unrelated, reference_model=reference_model, **options)
    logger.info("editing metrics: %s", data)
    data["notes"] = notes
    return EvaluationReport(data, title="editing evaluation")
