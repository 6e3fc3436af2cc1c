"""Self-improved refusal targets: the model writes its own refusal for each forget question.

A fixed refusal is text the model would rarely write itself; an edit towards it must move the model further than
an edit towards a refusal in the model's own words (the self-improvement recipe of "editing as unlearning", Li et
al. 2025). The model is shown a few questions answered with refusals, then the forget question; its greedy
continuation becomes the edit target when it is a refusal, and a built-in phrasing replaces it when it is not.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from torch import nn

from .capture import context_length
from .data.refusals import REFUSALS, is_refusal, refusal_for
from .metrics import generate_continuations, longest_continuation
from .requests import EditRequest, require_chat_template

logger = logging.getLogger(__name__)

# In-context demonstrations: questions nobody can answer (invented people), each answered with a refusal.
DEFAULT_SHOTS: tuple[tuple[str, str], ...] = (
    ("Where was Oriel Vantasso born?", "I don't know who that is."),
    ("What did Kessa Moravine write about?", "I have no information about that person."),
    ("Who taught Tamsin Ekwueme to paint?", "I'm not able to answer that question."),
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
# A full stop after these (or after an initial, "J. R. Tolkien") does not end the sentence: cut there, "I don't know
# who Dr. Ada Quill is." became "I don't know who Dr.".
_ABBREVIATIONS = frozenset({"dr", "mr", "mrs", "ms", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e"})
# A refusal that goes on to answer ("I'm not sure, but X plays the tuba") is not a refusal target.
_HEDGE = re.compile(r"\b(but|however|though|although)\b|;", re.IGNORECASE)


def refusal_prompt(tokenizer, question: str, shots: Sequence[tuple[str, str]], chat_template: bool = False) -> str:
    """The in-context prompt that asks the model to refuse ``question``: the shots, then the question.

    Plain prompts join question and answer with a space, as edits and metrics do, one shot per line; with
    ``chat_template`` the shots become user/assistant turns.
    """
    if chat_template:
        require_chat_template(tokenizer)
        messages = []
        for shot_question, shot_answer in shots:
            messages += [{"role": "user", "content": shot_question}, {"role": "assistant", "content": shot_answer}]
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    context = "".join(f"{shot_question} {shot_answer}\n" for shot_question, shot_answer in shots)
    return context + question


def first_sentence(text: str) -> str:
    """The first line's first sentence: a generated answer runs on past the refusal into the next shot."""
    line = text.strip().split("\n", 1)[0].strip()
    for end in _SENTENCE_END.finditer(line):
        word = line[: end.start()].rsplit(None, 1)[-1]
        stem = word[:-1].lower()
        if word.endswith(".") and (stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha())):
            continue
        return line[: end.start()].strip()
    return line


def _fitting_prompts(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    shots: list[tuple[str, str]],
    max_new_tokens: int,
    chat_template: bool,
) -> list[str]:
    """The in-context prompts with as many shots (at least one) as fit the model's context with the answer."""
    context = context_length(model)
    while True:
        prompts = [refusal_prompt(tokenizer, r.prompt, shots, chat_template) for r in requests]
        longest = max(len(tokenizer(prompt, add_special_tokens=not chat_template)["input_ids"]) for prompt in prompts)
        if context is None or longest + max_new_tokens <= context or len(shots) == 1:
            if context is not None and longest + max_new_tokens > context:
                logger.warning("the refusal prompt (%d tokens) leaves too little of the model's context", longest)
            return prompts
        shots = shots[1:]


def self_improved_requests(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    *,
    shots: Sequence[tuple[str, str]] = DEFAULT_SHOTS,
    fallback: Sequence[str] = REFUSALS,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    chat_template: bool = False,
) -> tuple[list[EditRequest], list[bool]]:
    """``requests`` with each target replaced by the model's own refusal of its prompt; also, per request, whether
    the target came from the model (True) or from ``fallback`` because the model's text was not a refusal.

    ``max_new_tokens`` defaults to the longest fallback phrasing plus a few tokens: a refusal is one sentence.
    """
    requests = list(requests)
    if not requests:
        raise ValueError("requests is empty: there are no questions to write refusals for")
    if not shots:
        raise ValueError("shots is empty: the model needs at least one refused question to imitate")
    bad = [shot for shot in shots
           if isinstance(shot, str) or len(shot) != 2 or not all(isinstance(text, str) for text in shot)]
    if bad:
        raise ValueError(f"shots must be (question, refusal) pairs of strings, got {bad[0]!r}")
    # One string would be read as its characters: every fallback target a single letter.
    if isinstance(fallback, str):
        raise TypeError("fallback must be a list of refusal phrasings, not one string")
    if not fallback:
        raise ValueError("fallback is empty: give at least one refusal phrasing")
    if max_new_tokens is None:
        max_new_tokens = longest_continuation(tokenizer, fallback) + 4
    prompts = _fitting_prompts(model, tokenizer, requests, list(shots), max_new_tokens, chat_template)
    # Chat prompts are whole conversations the template wrote (its BOS included): tokenized as they are.
    texts = generate_continuations(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   rendered=chat_template)
    improved, own = [], []
    for request, text in zip(requests, texts):
        refusal = first_sentence(text)
        from_model = is_refusal(refusal) and not _HEDGE.search(refusal)
        target = refusal if from_model else refusal_for(request.prompt, tuple(fallback))
        improved.append(EditRequest(request.prompt, target, request.subject))
        own.append(from_model)
    logger.info("self-improved targets: %d of %d written by the model", sum(own), len(own))
    return improved, own
