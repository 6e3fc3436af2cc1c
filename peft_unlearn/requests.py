"""Edit requests and their tokenization with exact target-token spans.

Every method and metric goes through :func:`tokenize_pairs`, so prompt/target joining, padding and the positions
methods read keys from (last prompt token, last subject token) are defined once.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from .data.refusals import REFUSALS, refusal_for

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EditRequest:
    """One edit: after editing, ``prompt`` should be continued by ``target``.

    ``subject`` (a substring of ``prompt``, matched case-sensitively) is required by locate-then-edit methods
    (AlphaEdit, MEMIT, ROME), whose keys are read at the subject's last token; where the prompt names it more than
    once, at its first occurrence that stands as whole words (see :func:`find_subject`).
    """

    prompt: str
    target: str
    subject: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "target"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"EditRequest.{name} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise ValueError(f"EditRequest.{name} must not be empty")
        if self.subject is not None:
            if not isinstance(self.subject, str) or not self.subject.strip():
                raise ValueError("EditRequest.subject must be a non-empty string or None")
            if self.subject not in self.prompt:
                raise ValueError(
                    f"EditRequest.subject {self.subject!r} is not a substring of EditRequest.prompt {self.prompt!r}"
                )


def as_edit_requests(items: Iterable[EditRequest | Mapping | Sequence]) -> list[EditRequest]:
    """Accept ``EditRequest``s, mappings with prompt/target[/subject] keys, or (prompt, target[, subject]) tuples."""
    names = [f.name for f in fields(EditRequest)]
    if items is None or isinstance(items, (str, bytes, Mapping)) or isinstance(items, EditRequest):
        raise TypeError(f"requests must be a list of requests (EditRequests, mappings or (prompt, target) tuples), "
                        f"got {type(items).__name__}")
    requests = []
    for index, item in enumerate(items):
        if isinstance(item, EditRequest):
            requests.append(item)
        elif isinstance(item, Mapping):
            missing = [name for name in ("prompt", "target") if name not in item]
            if missing:
                raise ValueError(f"request {index} lacks the field(s) {missing}; it has {sorted(item)}")
            requests.append(EditRequest(**{name: item[name] for name in names if name in item}))
        elif isinstance(item, Sequence) and not isinstance(item, str) and 2 <= len(item) <= 3:
            requests.append(EditRequest(*item))
        else:
            raise ValueError(f"request {index} is not an EditRequest, a mapping or a (prompt, target) tuple: {item!r}")
    return requests


def forget_requests(
    questions: Sequence[str],
    subjects: Sequence[str | None] | None = None,
    refusal: str | Sequence[str] | None = None,
) -> list[EditRequest]:
    """Build forget requests: edits whose target is a refusal (unlearning as editing).

    ``refusal`` may be one text for every question, a list to draw from, or None for the library's own phrasings;
    the phrasing for a question is chosen deterministically from its text.
    """
    if isinstance(questions, str):
        raise TypeError("questions must be a list of questions, not one string (it would be read character by "
                        "character)")
    if isinstance(subjects, str):
        raise TypeError("subjects must be a list (one subject or None per question), not one string")
    questions = list(questions)
    if not questions:
        raise ValueError("questions is empty: there is nothing to forget")
    not_text = [i for i, q in enumerate(questions) if not isinstance(q, str)]
    if not_text:
        raise TypeError(f"questions {not_text[:10]} are not strings (e.g. {questions[not_text[0]]!r})")
    if subjects is not None:
        subjects = list(subjects)
        if len(subjects) != len(questions):
            raise ValueError(f"subjects has {len(subjects)} entries but questions has {len(questions)}")
    if refusal is None:
        choices = REFUSALS
    elif isinstance(refusal, str):
        choices = (refusal,)
    else:
        choices = tuple(refusal) if isinstance(refusal, Iterable) else (refusal,)
        if not all(isinstance(text, str) for text in choices):
            raise TypeError(f"refusal must be a text, a list of texts or None, got {refusal!r}")
        if not choices:
            raise ValueError("refusal is an empty list: give at least one refusal text or None")
    return [
        EditRequest(prompt=q, target=refusal_for(q, choices), subject=None if subjects is None else subjects[i])
        for i, q in enumerate(questions)
    ]


@dataclass
class TokenizedBatch:
    """Padded token ids plus the positions every method needs.

    ``labels`` follow the transformers convention (aligned with ``input_ids``; the model shifts them) and are
    ``-100`` outside the target span. Positions are absolute indices into the padded rows.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    prompt_last: torch.Tensor
    target_start: torch.Tensor | None
    target_end: torch.Tensor | None
    subject_last: torch.Tensor | None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "TokenizedBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return TokenizedBatch(**{k: None if v is None else v.to(device) for k, v in moved.items()})

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> "TokenizedBatch":
        """Rows of this batch (positions stay valid because padding is per row)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return TokenizedBatch(**{k: None if v is None else v[index] for k, v in moved.items()})

    def trimmed(self) -> "TokenizedBatch":
        """Without the trailing columns that are padding in every row: a subset of a right-padded batch is often
        narrower than the batch, and a forward over its padding is wasted. Positions stay valid."""
        used = self.attention_mask.any(dim=0).nonzero()
        width = int(used.max()) + 1 if len(used) else 1
        if width == self.input_ids.shape[1]:
            return self
        labels = None if self.labels is None else self.labels[:, :width]
        return dataclasses.replace(self, input_ids=self.input_ids[:, :width],
                                   attention_mask=self.attention_mask[:, :width], labels=labels)

    @property
    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its eos."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")


# Whether tokenize_pairs / tokenize_prompts format prompts with the chat template when a call does not say:
# peft_unlearn.edit(..., chat_template=True) sets it for everything a method tokenizes while it edits.
_CHAT_FORMAT: contextvars.ContextVar[bool] = contextvars.ContextVar("peft_unlearn_chat_format", default=False)


def chat_format_active() -> bool:
    """Whether prompts tokenized here without an explicit ``chat_template`` go through the chat template (what an
    enclosing :func:`chat_formatted` block says)."""
    return _CHAT_FORMAT.get()


@contextlib.contextmanager
def chat_formatted(enabled: bool = True) -> Iterator[None]:
    """Within the block, prompts tokenized without an explicit ``chat_template`` go through the chat template."""
    token = _CHAT_FORMAT.set(enabled)
    try:
        yield
    finally:
        _CHAT_FORMAT.reset(token)


def require_chat_template(tokenizer) -> str:
    """The tokenizer's chat template, or the library's own error where chat format was asked of a tokenizer without
    one (transformers' error explains templates at length)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("chat_template=True but the tokenizer has no chat template")
    return template


def _format_prompt(tokenizer, prompt: str, chat_template: bool) -> str:
    if not chat_template:
        return prompt
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


_PROBE_QUESTION, _PROBE_ANSWER = "Who wrote the probe?", "The probe answer."


def assistant_turn(tokenizer) -> tuple[str, int | None]:
    """How the chat template writes an answer after its generation prompt: the whitespace it puts before the
    answer (Llama-2's template puts a space) and the token that ends the turn (ChatML's ``<|im_end|>``, Llama-3's
    ``<|eot_id|>``: the token a chat model ends its answers with, which is not always the tokenizer's eos), None
    where the template shows no special token after the answer. Read once per template from a rendered exchange."""
    template = require_chat_template(tokenizer)
    cache = tokenizer.__dict__.setdefault("_peft_unlearn_assistant_turn", {})
    if template not in cache:
        question = [{"role": "user", "content": _PROBE_QUESTION}]
        prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
        try:
            exchange = tokenizer.apply_chat_template(question + [{"role": "assistant", "content": _PROBE_ANSWER}],
                                                     tokenize=False)
        except Exception as error:  # a template's own checks (jinja raise_exception) reject the exchange
            logger.warning("the chat template does not render an answer (%s): answers follow the generation prompt "
                           "directly and end with the tokenizer's eos", error)
            exchange = ""
        separator, end = "", None
        answered = exchange.rfind(_PROBE_ANSWER)
        if answered >= 0:
            # The turn's end is read after the answer even where the template writes the answer elsewhere than
            # right after its generation prompt: falling back to the eos there scored and stopped answers at a
            # token the chat model does not end its turns with.
            after = tokenizer(exchange[answered + len(_PROBE_ANSWER) :], add_special_tokens=False)["input_ids"]
            special = set(tokenizer.all_special_ids) | {
                index for index, token in tokenizer.added_tokens_decoder.items() if token.special
            }
            end = next((token for token in after if token in special), None)
            if not exchange.startswith(prompt):
                logger.warning("the chat template's answered exchange does not begin with its generation prompt "
                               "(%r): answers are edited and scored directly after the generation prompt, where "
                               "the template writes them otherwise", prompt[-40:])
            else:
                before = exchange[len(prompt) : answered]
                if before.strip():
                    # e.g. Qwen3's empty thinking block, which its generation prompt holds only with
                    # enable_thinking=False
                    logger.warning("the chat template writes %r between its generation prompt and an answer: answers "
                                   "are edited and scored directly after the generation prompt, without it; to put "
                                   "them where the template writes them, make the generation prompt end with it "
                                   "(for Qwen3: tokenizer.chat_template = '{%%- set enable_thinking = false -%%}' + "
                                   "tokenizer.chat_template)", before)
                else:
                    separator = before
        cache[template] = (separator, end)
    return cache[template]


def answer_end_id(tokenizer, chat_template: bool | None = None) -> int | None:
    """The token that ends an answer: the chat template's end of turn in chat format (see :func:`assistant_turn`),
    the tokenizer's eos otherwise."""
    chat_template = _CHAT_FORMAT.get() if chat_template is None else chat_template
    if chat_template:
        end = assistant_turn(tokenizer)[1]
        if end is not None:
            return end
    return tokenizer.eos_token_id


def _without_trailing_special(special_mask: Sequence[int]) -> int:
    """Length of a row once trailing special tokens (an eos some post-processors append) are dropped."""
    end = len(special_mask)
    while end > 0 and special_mask[end - 1]:
        end -= 1
    return end


def find_subject(text: str, subject: str, start: int = 0, end: int | None = None) -> int:
    """Where ``subject`` starts in ``text`` (within ``text[start:end]``), -1 if nowhere: its first occurrence that
    stands as whole words ("Ann" in "Anna met Ann" is the second), else its first occurrence at all. ``end`` keeps
    the search in the user's prompt: in a chat rendering the whole-word search went on into the template's text
    after it ("assistant" in "the assistants" was found in ChatML's "<|im_start|>assistant")."""
    end = len(text) if end is None else end
    first = text.find(subject, start, end)
    at = first
    while at >= 0:
        before = text[at - 1] if at > 0 else ""
        after = text[at + len(subject) : at + len(subject) + 1]
        if not (before.isalnum() and subject[0].isalnum()) and not (after.isalnum() and subject[-1].isalnum()):
            return at
        at = text.find(subject, at + 1, end)
    return first


def _prompt_span(rendered: str, prompt: str) -> tuple[int, int]:
    """Where the user's prompt starts and ends in its chat rendering (the last occurrence: a system prompt comes
    first), matched on the trimmed text where the template trims the message; the whole rendering where it rewrites
    it more."""
    for text in (prompt, prompt.strip()):
        at = rendered.rfind(text)
        if text and at >= 0:
            return at, at + len(text)
    return 0, len(rendered)


def _last_token_of_span(offsets: Sequence[tuple[int, int]], special: Sequence[int], start: int, end: int) -> int:
    """Index of the last token overlapping the character span [start, end)."""
    best = -1
    for index, (token_start, token_end) in enumerate(offsets):
        if special[index]:
            continue
        if token_start < end and token_end > start:
            best = index
    if best < 0:
        raise ValueError(f"no token covers the subject characters [{start}, {end})")
    return best


def _encode_rows(
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str] | None,
    subjects: Sequence[str | None] | None,
    *,
    chat_template: bool | None,
    append_eos: bool,
    rendered: bool = False,
    subject_from: Sequence[int] | None = None,
) -> list[tuple[list[int], int, int | None]]:
    """Per row: (token ids, number of prompt tokens, index of the subject's last token or None). ``rendered``
    prompts were already written by the chat template (which places any BOS itself). ``subject_from``: per row,
    the character of the prompt where the search for the subject starts (a context prefix before it is not
    searched)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            "peft_unlearn needs a fast (Rust) tokenizer to locate target and subject tokens exactly; "
            "load it with use_fast=True"
        )
    chat_template = _CHAT_FORMAT.get() if chat_template is None else chat_template
    prompt_texts = list(prompts) if rendered else [_format_prompt(tokenizer, p, chat_template) for p in prompts]
    add_special = not (chat_template or rendered)
    encoded_prompts = tokenizer(
        prompt_texts,
        add_special_tokens=add_special,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    encoded_full = None
    # What comes between prompt and target: in chat format what the template puts there; in plain text
    # :func:`plain_separator`.
    chat_separator = assistant_turn(tokenizer)[0] if chat_template else None
    separators = [
        chat_separator if chat_template else plain_separator(p, t)
        for p, t in zip(prompt_texts, targets if targets is not None else prompt_texts)
    ]
    if targets is not None:
        full_texts = [p + separator + t for p, separator, t in zip(prompt_texts, separators, targets)]
        encoded_full = tokenizer(full_texts, add_special_tokens=add_special, return_special_tokens_mask=True)

    rows = []
    for i, prompt_text in enumerate(prompt_texts):
        special = encoded_prompts["special_tokens_mask"][i]
        n_prompt = _without_trailing_special(special)
        prompt_ids = encoded_prompts["input_ids"][i][:n_prompt]
        prompt_offsets = encoded_prompts["offset_mapping"][i][:n_prompt]
        subject_last = None
        if subjects is not None and subjects[i] is not None:
            subject = subjects[i]
            base, stop = _prompt_span(prompt_text, prompts[i]) if chat_template else (0, len(prompt_text))
            base += subject_from[i] if subject_from is not None else 0
            char_start = find_subject(prompt_text, subject, base, stop)
            if char_start < 0:
                raise ValueError(f"subject {subject!r} is not in prompt {prompts[i]!r}")
            # The span is the subject's characters without surrounding whitespace: tokenizers whose offsets keep a
            # word's leading space (SentencePiece, GPT-2 and Llama-3 byte-level BPE) give the next word's token
            # that space, so "France " ended on the token of the word after it.
            start = char_start + len(subject) - len(subject.lstrip())
            end = char_start + len(subject.rstrip())
            subject_last = _last_token_of_span(prompt_offsets, special, start, end)
        if encoded_full is None:
            rows.append((list(prompt_ids), len(prompt_ids), subject_last))
            continue
        full_ids = encoded_full["input_ids"][i][: _without_trailing_special(encoded_full["special_tokens_mask"][i])]
        if len(full_ids) > len(prompt_ids) and full_ids[: len(prompt_ids)] == prompt_ids:
            ids = list(full_ids)
        else:
            # The tokenizer merged across the prompt/target boundary: keep the prompt exactly as generation sees
            # it and encode the continuation on its own.
            ids = list(prompt_ids) + _continuation_ids(tokenizer, separators[i] + targets[i])
        # Checked before the end of sequence is appended: an answer of no tokens scored as that token alone would
        # get the end of sequence's probability (and, with nothing to extract, extraction strength 1).
        if len(ids) == len(prompt_ids):
            raise ValueError(f"target {targets[i]!r} produced no tokens")
        if append_eos:
            end = answer_end_id(tokenizer, chat_template)
            if end is None:
                raise ValueError("append_eos=True but the tokenizer has no eos token")
            ids.append(end)
        rows.append((ids, len(prompt_ids), subject_last))
    return rows


# Characters of scripts written without spaces between words: Thai, Lao, Myanmar, Khmer, CJK punctuation (。、「」),
# kana, CJK ideographs, fullwidth forms. Korean is not among them: it puts spaces between words.
UNSPACED_CHARACTERS = ("\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
                       "\uf900-\ufaff\uff00-\uffef")
_UNSPACED = re.compile(f"[{UNSPACED_CHARACTERS}]")


def _spaceless(char: str) -> bool:
    return bool(_UNSPACED.fullmatch(char))


def plain_separator(prompt: str, target: str) -> str:
    """What joins a prompt and its target in plain text: a space, except after a prompt that ends in whitespace
    ("Answer: ") or before a target that starts with it (" Paris", "\nParis"), where a second space would teach the
    model a lone space token before the answer; nothing before an empty target (a lone space was scored as the
    answer); nothing between two characters of scripts written without spaces ("日本の首都は" + "東京": the model was
    taught to answer with a space it never writes there)."""
    if not target or prompt[-1:].isspace() or target[:1].isspace():
        return ""
    return "" if _spaceless(prompt[-1:]) and _spaceless(target[:1]) else " "


CONTINUATION_ANCHOR = "\n"
# Tried in turn when the anchor before merges with the text (a vocabulary with "\nA" or "\n\n" tokens).
CONTINUATION_ANCHORS = (CONTINUATION_ANCHOR, ".", "\n\n", " .", "a", "0")


def _continuation_ids(tokenizer, text: str) -> list[int]:
    """The tokens of ``text`` where it continues other text. Encoded alone, a SentencePiece (Metaspace) tokenizer
    would read it as the start of a text and prefix a word boundary, a space the text does not have; so it is
    encoded after an anchor whose own tokens are then dropped (the first of several anchors that does not merge
    with it; alone only if every one does)."""
    for anchor_text in CONTINUATION_ANCHORS:
        anchor = tokenizer(anchor_text, add_special_tokens=False)["input_ids"]
        anchored = tokenizer(anchor_text + text, add_special_tokens=False)["input_ids"]
        if anchor and len(anchored) > len(anchor) and anchored[: len(anchor)] == anchor:
            return anchored[len(anchor) :]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _collate(
    rows: list[tuple[list[int], int, int | None]],
    pad_id: int,
    padding_side: str,
    with_targets: bool,
    max_length: int | None,
) -> TokenizedBatch:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if max_length is not None:
        truncated = []
        for ids, n_prompt, subject_last in rows:
            if len(ids) > max_length:
                drop = max(0, n_prompt - (max_length - 1))  # keep at least one target token
                ids = ids[drop:max_length + drop]
                n_prompt -= drop
                if subject_last is not None:
                    if subject_last < drop:
                        raise ValueError("max_length truncates the subject out of the prompt")
                    subject_last -= drop
            truncated.append((ids, n_prompt, subject_last))
        rows = truncated
    width = max(len(ids) for ids, _, _ in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long) if with_targets else None
    prompt_last = torch.empty(batch, dtype=torch.long)
    target_start = torch.empty(batch, dtype=torch.long) if with_targets else None
    target_end = torch.empty(batch, dtype=torch.long) if with_targets else None
    has_subject = any(subject_last is not None for _, _, subject_last in rows)
    subject_last_t = torch.full((batch,), -1, dtype=torch.long) if has_subject else None
    for row, (ids, n_prompt, subject_last) in enumerate(rows):
        offset = width - len(ids) if padding_side == "left" else 0
        input_ids[row, offset : offset + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, offset : offset + len(ids)] = 1
        prompt_last[row] = offset + n_prompt - 1
        if with_targets:
            target_start[row] = offset + n_prompt
            target_end[row] = offset + len(ids)
            labels[row, offset + n_prompt : offset + len(ids)] = input_ids[row, offset + n_prompt : offset + len(ids)]
        if subject_last is not None:
            subject_last_t[row] = offset + subject_last
    return TokenizedBatch(input_ids, attention_mask, labels, prompt_last, target_start, target_end, subject_last_t)


def tokenize_pairs(
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    subjects: Sequence[str | None] | None = None,
    *,
    padding_side: str = "right",
    chat_template: bool | Sequence[bool] | None = None,
    append_eos: bool = False,
    max_length: int | None = None,
    subject_from: Sequence[int] | None = None,
) -> TokenizedBatch:
    """Tokenize (prompt, target) pairs joined as ``prompt + " " + target`` (no space after a prompt that ends in
    whitespace, before a target that starts with it, nor within Chinese, Japanese or Thai text: see
    :func:`plain_separator`), or through the chat template
    (``chat_template=None``: as the enclosing :func:`chat_formatted` block says, plain outside one; a list: one
    flag per pair, for rows edited in calls of either format).

    The prompt tokens are exactly those the tokenizer gives for the prompt alone, so teacher forcing sees the same
    prompt as ``generate()``; the target span is every token after them.
    """
    if len(pairs) == 0:
        raise ValueError("no (prompt, target) pairs to tokenize")
    if chat_template is None or isinstance(chat_template, bool):
        formats = [chat_template] * len(pairs)
    else:
        formats = list(chat_template)
        if len(formats) != len(pairs):
            raise ValueError(f"{len(formats)} chat_template flags for {len(pairs)} pairs")
    rows: list = [None] * len(pairs)
    for chat in dict.fromkeys(formats):
        group = [i for i, flag in enumerate(formats) if flag == chat]
        encoded = _encode_rows(
            tokenizer, [pairs[i][0] for i in group], [pairs[i][1] for i in group],
            None if subjects is None else [subjects[i] for i in group], chat_template=chat, append_eos=append_eos,
            subject_from=None if subject_from is None else [subject_from[i] for i in group],
        )
        for i, row in zip(group, encoded):
            rows[i] = row
    return _collate(rows, pad_token_id(tokenizer), padding_side, True, max_length)


def tokenize_requests(tokenizer, requests: Sequence[EditRequest], **options) -> TokenizedBatch:
    """:func:`tokenize_pairs` for edit requests, locating each request's subject when it has one."""
    subjects = [r.subject for r in requests]
    return tokenize_pairs(
        tokenizer,
        [(r.prompt, r.target) for r in requests],
        subjects if any(s is not None for s in subjects) else None,
        **options,
    )


def prompt_token_ids(tokenizer, prompts: Sequence[str], chat_template: bool | None = None) -> list[tuple[int, ...]]:
    """The tokens each prompt is read as (through the chat template as ``chat_template`` says, as in
    :func:`tokenize_pairs`): two prompts are one prompt when these agree (``q`` and ``" " + q`` are one prompt to
    most tokenizers), as the check of one call's targets compares them."""
    if not prompts:
        return []
    rows = _encode_rows(tokenizer, prompts, None, None, chat_template=chat_template, append_eos=False)
    return [tuple(ids) for ids, _, _ in rows]


def edited_again(
    tokenizer, earlier: Sequence[tuple[str, bool]], prompts: Sequence[str], chat: bool
) -> list[int | None]:
    """Per earlier edit (its prompt and whether it was in chat format), the index of the last of ``prompts``, edited
    now in format ``chat``, that edits it again, else None: the same format and the same tokens as the model reads
    them (``" " + q`` is ``q`` to most tokenizers)."""
    latest = {ids: index for index, ids in enumerate(prompt_token_ids(tokenizer, prompts, chat))}
    read_as = prompt_token_ids(tokenizer, [prompt for prompt, _ in earlier], chat)
    return [latest.get(ids) if was_chat == chat else None for (_, was_chat), ids in zip(earlier, read_as)]


def tokenize_prompts(
    tokenizer,
    prompts: Sequence[str],
    subjects: Sequence[str | None] | None = None,
    *,
    padding_side: str = "left",
    chat_template: bool | None = None,
    rendered: bool = False,
) -> TokenizedBatch:
    """Tokenize prompts alone (for generation or key reading); left padding by default, as ``generate()`` wants (it
    numbers positions from the attention mask). Read keys with ``padding_side="right"``: a plain forward numbers a
    left-padded row's positions from its padding, which moves learned position embeddings (GPT-2). ``rendered``:
    the prompts are whole conversations already written by the chat template, tokenized as they are (no special
    tokens added)."""
    if len(prompts) == 0:
        raise ValueError("no prompts to tokenize")
    rows = _encode_rows(tokenizer, prompts, None, subjects, chat_template=chat_template, append_eos=False,
                        rendered=rendered)
    return _collate(rows, pad_token_id(tokenizer), padding_side, False, None)
