"""Basic batched metrics: teacher-forced answer accuracy and greedy-generation match."""

from __future__ import annotations

import contextlib
import re
import unicodedata
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import context_length
from .losses import label_token_scores, labelled_logits, predicted_accuracy, row_chunks
from .requests import UNSPACED_CHARACTERS, TokenizedBatch, answer_end_id, pad_token_id, tokenize_pairs, tokenize_prompts

# Plain greedy decoding whatever the model's generation config ships (chat models often set a repetition
# penalty, some an n-gram ban or beams, or a minimum length, which generated on past the end of the answer): every
# method and model is then measured by the same decoding.
GREEDY = dict(do_sample=False, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0,
              min_new_tokens=None)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for a while, then every module's own training flag back. One flag restored for all would be wrong:
    ``get_peft_model`` leaves the wrapper in training mode around an eval-mode model, and ``train(True)`` on it
    would switch the base model's dropout on."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate without gradients in eval mode, restoring every module's training flag afterwards."""
    with evaluating(model), torch.no_grad():
        yield model


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        # batch_size=1.5 failed with a raw "'float' object cannot be interpreted as an integer"
        raise ValueError(f"batch_size must be positive and an integer, got {batch_size!r}")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def length_sorted(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of ``batch_size``, longest first: rows of similar length share a batch, so little of it
    is padding (TOFU answers run from 5 to 90 tokens), and the largest batch comes first. Each row's result does not
    depend on its batch; callers put them back in the original order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [list(chunk) for chunk in batches(order, batch_size)]


def pair_batches(
    tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int, **options
) -> list[tuple[list[int], TokenizedBatch]]:
    """:func:`~peft_unlearn.requests.tokenize_pairs` of ``pairs`` (with ``options``) in :func:`length_sorted` batches,
    each with the indices of its rows in ``pairs``."""
    encoded = tokenize_pairs(tokenizer, pairs, **options)
    groups = length_sorted(encoded.attention_mask.sum(dim=1).tolist(), batch_size)
    return [(rows, encoded.select(rows).trimmed()) for rows in groups]


def scored_batches(
    model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int, progress: bool = False, **options
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Teacher-forced :func:`~peft_unlearn.losses.label_token_scores` of ``pairs`` (tokenized with ``options``) in
    :func:`pair_batches`: per batch the indices of its rows in ``pairs``, its labels (aligned with the scores), the
    label log-probabilities, the argmax tokens and the scored mask. A batch whose labelled logits pass
    :data:`~peft_unlearn.losses.LOGIT_BUDGET` runs in row chunks: the logits of a large vocabulary bound memory."""
    device = model_device(model)
    for rows, batch in tqdm(pair_batches(tokenizer, pairs, batch_size, **options), desc="scoring answers",
                            disable=not progress, leave=False):
        for part in row_chunks(model, batch.labels):
            chunk = batch if part is None else batch.select(part).trimmed()
            chunk = chunk.to(device)
            logits, labels = labelled_logits(model, chunk.model_inputs, chunk.labels)
            scores = label_token_scores(logits, labels)
            del logits  # the largest tensor of the batch, not kept through the next forward
            yield (rows if part is None else [rows[i] for i in part.tolist()]), labels, *scores


def answer_accuracy(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 64,
    chat_template: bool = False,
    per_example: bool = False,
    progress: bool = False,
) -> float | list[float]:
    """Teacher-forced accuracy over the answer tokens of ``prompt + " " + answer`` (joined as
    :func:`~peft_unlearn.requests.tokenize_pairs` joins them), averaged over pairs; ``progress`` shows a bar over the
    batches."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty")
    scores = [0.0] * len(pairs)
    with eval_mode(model):
        for rows, labels, _, predicted, _ in scored_batches(model, tokenizer, pairs, batch_size, progress,
                                                            chat_template=chat_template):
            for row, score in zip(rows, predicted_accuracy(predicted, labels).tolist()):
                scores[row] = score
    return scores if per_example else sum(scores) / len(scores)


def generate_continuations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    chat_template: bool = False,
    rendered: bool = False,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (in :func:`length_sorted` batches, left-padded), decoded without special
    tokens; at most as many new tokens as the model's context leaves after each prompt (its own, not the batch's
    longest: a continuation does not depend on the prompts batched with it). In chat format generation also stops
    at the template's end of turn, where teacher-forced scoring ends an answer. ``rendered``: the prompts are
    conversations the chat template already wrote (see :func:`~peft_unlearn.requests.tokenize_prompts`)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        # 1.5 was passed on to generate(), which took it without a word
        raise ValueError(f"max_new_tokens must be a positive integer or None, got {max_new_tokens!r}")
    prompts = list(prompts)
    if not prompts:
        return []
    device = model_device(model)
    texts = [""] * len(prompts)
    pad_id = pad_token_id(tokenizer)
    stop = stop_token_ids(model, tokenizer, chat_template=chat_template or rendered)

    def tokenize(chunk: Sequence[str]):
        return tokenize_prompts(tokenizer, chunk, padding_side="left", chat_template=chat_template, rendered=rendered)

    def generate(batch, room: int) -> list[str]:
        batch = batch.to(device)
        output = model.generate(
            **batch.model_inputs, max_new_tokens=room, pad_token_id=pad_id, eos_token_id=stop, **GREEDY
        )
        return tokenizer.batch_decode(output[:, batch.input_ids.shape[1] :], skip_special_tokens=True)

    groups = length_sorted(tokenize(prompts).attention_mask.sum(dim=1).tolist(), batch_size)
    with eval_mode(model):
        for indices in tqdm(groups, desc="generating", disable=not progress, leave=False):
            chunk = [prompts[i] for i in indices]
            batch = tokenize(chunk)
            rooms = [_room_to_generate(model, n, max_new_tokens) for n in batch.attention_mask.sum(dim=1).tolist()]
            if len(set(rooms)) == 1:  # the usual case: no prompt comes near the context's end
                out = generate(batch, rooms[0])
            else:
                # Prompts near the context's end get fewer new tokens, each group in a batch of its own width; the
                # others keep max_new_tokens.
                out = [""] * len(chunk)
                for room in set(rooms):
                    rows = [i for i, r in enumerate(rooms) if r == room]
                    for i, text in zip(rows, generate(tokenize([chunk[i] for i in rows]), room)):
                        out[i] = text
            for i, text in zip(indices, out):
                texts[i] = text
    return texts


def longest_continuation(tokenizer, texts: Sequence[str]) -> int:
    """The most tokens any of ``texts`` takes as a continuation (after a space): what a generation budget that must
    hold each whole answer starts from."""
    return max(len(tokenizer(" " + text, add_special_tokens=False)["input_ids"]) for text in texts)


def _room_to_generate(model: nn.Module, prompt_width: int, max_new_tokens: int) -> int:
    """``max_new_tokens``, or fewer where the model's context ends first: learned position embeddings fail with an
    index error past it, rotary ones produce text from positions the model never saw."""
    limit = context_length(model)
    if limit is None:
        return max_new_tokens
    if prompt_width >= limit:
        raise ValueError(f"the prompts need {prompt_width} positions, more than the model's context of {limit} leaves "
                         "for an answer; shorten them")
    return min(max_new_tokens, limit - prompt_width)


def stop_token_ids(model: nn.Module, tokenizer, chat_template: bool = False) -> list[int] | None:
    """Where generation ends: the model's own stop tokens (a chat model's end of turn often lives only in its
    generation config), the tokenizer's end of sequence and, in chat format, the chat template's end of turn
    (the token teacher-forced scoring ends an answer with, see :func:`~peft_unlearn.requests.answer_end_id`)."""
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    ends = [tokenizer.eos_token_id, answer_end_id(tokenizer, True) if chat_template else None]
    ids.extend(end for end in dict.fromkeys(ends) if end is not None and end not in ids)
    return ids or None


def sample_texts(
    model: nn.Module, tokenizer, starters: Sequence[str], *, max_new_tokens: int = 16, seed: int = 0, top_k: int = 5
) -> list[str]:
    """The model's own text: one sampled continuation per starter (deterministic for ``seed``), starter included.

    Methods use it where they need ordinary inputs of the model's own distribution (context prefixes, unrelated
    prompts) without a corpus.
    """
    device = model_device(model)
    batch = tokenize_prompts(tokenizer, list(starters), padding_side="left").to(device)
    pad_id = pad_token_id(tokenizer)
    with eval_mode(model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        output = model.generate(
            **batch.model_inputs, max_new_tokens=max_new_tokens, do_sample=True, top_k=top_k, pad_token_id=pad_id
        )
    continuations = tokenizer.batch_decode(output[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    return [" ".join(f"{starter} {text}".split()) for starter, text in zip(starters, continuations)]


def collapse_whitespace(text: str) -> str:
    """``text`` with every run of whitespace one space and no leading or trailing whitespace."""
    return re.sub(r"\s+", " ", text).strip()


# Scripts written without spaces between words, and Korean, whose particles join the word before them: any two of
# their characters may meet at a word boundary ("北京是首都" begins with the answer "北京", "서울은" with "서울").
_UNSPACED = re.compile(f"[{UNSPACED_CHARACTERS}\uac00-\ud7af]")


def starts_with_answer(generated: str, expected: str) -> bool:
    """Whether ``generated`` begins with ``expected`` (whitespace collapsed, both in Unicode NFKC form as tokenizers
    that normalise write them) and the match ends at a word boundary: "a hedgehog" does not begin with the answer
    "a hedge"; in scripts without spaces between words every character ends one."""
    generated = unicodedata.normalize("NFKC", collapse_whitespace(generated))
    expected = unicodedata.normalize("NFKC", collapse_whitespace(expected))
    if not expected or not generated.startswith(expected):
        return False
    rest = generated[len(expected) :]
    if _UNSPACED.match(expected[-1]) or (rest and _UNSPACED.match(rest[0])):
        return True
    return not (rest and rest[0].isalnum() and expected[-1].isalnum())


def generation_match(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    chat_template: bool = False,
    per_example: bool = False,
    progress: bool = False,
) -> float | list[bool]:
    """Fraction of prompts whose greedy, batched generation begins with the expected answer; ``progress`` shows a
    bar over the batches."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty")
    blank = [i for i, (_, answer) in enumerate(pairs) if not answer.strip()]
    if blank:
        raise ValueError(f"answers {blank[:10]} are empty: every text would begin with them")
    if max_new_tokens is None:
        max_new_tokens = longest_continuation(tokenizer, [answer for _, answer in pairs]) + 2
    generated = generate_continuations(
        model,
        tokenizer,
        [prompt for prompt, _ in pairs],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chat_template=chat_template,
        progress=progress,
    )
    matches = [starts_with_answer(text, answer) for text, (_, answer) in zip(generated, pairs)]
    return matches if per_example else sum(matches) / len(matches)
