"""Forget and retain sets for gradient-based unlearning: validation, tokenization with answer-span masking, and
the pairing of every forget row with a retain row."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from ..data.refusals import refusal_for
from ..requests import IGNORE_INDEX, tokenize_pairs

logger = logging.getLogger(__name__)

QA_COLUMNS = ("question", "answer")
TEXT_COLUMN = "text"
# tokenize_pairs pads a whole call to its longest row; chunks keep that padding small on large sets.
TOKENIZE_CHUNK = 512


@dataclass(frozen=True)
class TokenizedRow:
    """One example: token ids and labels (``-100`` where no loss is taken), unpadded."""

    input_ids: list[int]
    labels: list[int]


def as_rows(data: Any, name: str) -> list[dict[str, Any]]:
    """Rows of a forget/retain set as dicts: a ``datasets.Dataset``, mappings, or (question, answer) pairs."""
    if data is None:
        raise ValueError(f"{name} is None: give a dataset with question/answer or text rows")
    if hasattr(data, "column_names") and hasattr(data, "to_list"):
        rows = data.to_list()
    elif isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Sequence):
        raise TypeError(
            f"{name} must be a datasets.Dataset or a list of rows (dicts or (question, answer) pairs), "
            f"got {type(data).__name__}"
        )
    else:
        rows = []
        for index, row in enumerate(data):
            if isinstance(row, Mapping):
                rows.append(dict(row))
            elif isinstance(row, Sequence) and not isinstance(row, str) and len(row) == 2:
                rows.append({"question": row[0], "answer": row[1]})
            else:
                raise TypeError(f"{name} row {index} is neither a mapping nor a (question, answer) pair: {row!r}")
    if not rows:
        raise ValueError(f"{name} is empty: give at least one question/answer or text row")
    return rows


def row_format(rows: list[dict[str, Any]], name: str) -> str:
    """``"qa"`` for TOFU-schema rows (question, answer) or ``"text"`` for raw text rows; anything else is an error
    that names the missing columns."""
    first = rows[0]
    if all(column in first for column in QA_COLUMNS):
        kind, columns = "qa", QA_COLUMNS
    elif TEXT_COLUMN in first:
        kind, columns = "text", (TEXT_COLUMN,)
    else:
        missing = [column for column in QA_COLUMNS if column not in first]
        raise ValueError(
            f"{name} rows need the columns {list(QA_COLUMNS)} (TOFU schema) or {TEXT_COLUMN!r} (raw text); "
            f"row 0 lacks {missing} and has {sorted(first)}"
        )
    for index, row in enumerate(rows):
        for column in columns:
            if column not in row:
                raise ValueError(f"{name} row {index} lacks the column {column!r}; it has {sorted(row)}")
            if not isinstance(row[column], str) or not row[column].strip():
                raise ValueError(f"{name} row {index} has an empty or non-string {column!r}: {row[column]!r}")
    return kind


def tokenize_rows(
    tokenizer,
    rows: list[dict[str, Any]],
    kind: str,
    *,
    max_length: int,
    append_eos: bool,
    chat_template: bool,
) -> list[TokenizedRow]:
    """Question/answer rows: loss on the answer tokens only (the foundation's answer-span masking); text rows: loss
    on every token (as written: a chat template formats question/answer rows only)."""
    if kind == "text":
        if chat_template:
            logger.warning("chat_template=True formats question/answer rows; these %d raw text rows are trained as "
                           "written (give question/answer rows to train in the chat format)", len(rows))
        encoded = tokenizer(
            [row[TEXT_COLUMN] for row in rows], add_special_tokens=True, truncation=True, max_length=max_length
        )["input_ids"]
        if append_eos and tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True but the tokenizer has no eos token")
        tokenized = []
        for ids in encoded:
            if append_eos and ids[-1] != tokenizer.eos_token_id:
                ids = ids[: max_length - 1] + [tokenizer.eos_token_id]
            tokenized.append(TokenizedRow(list(ids), list(ids)))
        return tokenized
    pairs = [(row["question"], row["answer"]) for row in rows]
    return tokenize_qa_pairs(
        tokenizer, pairs, max_length=max_length, append_eos=append_eos, chat_template=chat_template
    )


def tokenize_qa_pairs(
    tokenizer, pairs: list[tuple[str, str]], *, max_length: int, append_eos: bool, chat_template: bool
) -> list[TokenizedRow]:
    """Answer-span masked rows, unpadded again after :func:`tokenize_pairs` (right padding)."""
    tokenized = []
    for start in range(0, len(pairs), TOKENIZE_CHUNK):
        batch = tokenize_pairs(
            tokenizer,
            pairs[start : start + TOKENIZE_CHUNK],
            padding_side="right",
            append_eos=append_eos,
            max_length=max_length,
            chat_template=chat_template,
        )
        for ids, mask, labels in zip(batch.input_ids, batch.attention_mask, batch.labels):
            length = int(mask.sum())
            tokenized.append(TokenizedRow(ids[:length].tolist(), labels[:length].tolist()))
    return tokenized


def refusal_rows(
    tokenizer,
    rows: list[dict[str, Any]],
    refusals: Sequence[str],
    *,
    max_length: int,
    append_eos: bool,
    chat_template: bool,
) -> list[TokenizedRow]:
    """Each forget question answered with a refusal (deterministic per question): the target of "refusal" and the
    preferred answer of "idk_dpo"."""
    pairs = [(row["question"], refusal_for(row["question"], tuple(refusals))) for row in rows]
    return tokenize_qa_pairs(
        tokenizer, pairs, max_length=max_length, append_eos=append_eos, chat_template=chat_template
    )


class ForgetRetainDataset(Dataset):
    """One item per forget row, carrying the forget row, its refusal variant and a retain row.

    An epoch is one pass over the forget set (the TOFU protocol). Retain rows are walked in order, continuing across
    epochs (``set_epoch``) and cycling, so a retain set longer than the forget set is fully used over epochs and a
    shorter one repeats; the pairing depends only on (epoch, index), identically on every process.
    """

    def __init__(
        self,
        forget: list[TokenizedRow],
        retain: list[TokenizedRow] | None = None,
        forget_refusal: list[TokenizedRow] | None = None,
    ) -> None:
        if not forget:
            raise ValueError("the forget set is empty")
        if retain is not None and not retain:
            raise ValueError("the retain set is empty")
        if forget_refusal is not None and len(forget_refusal) != len(forget):
            raise ValueError("forget_refusal must have one row per forget row")
        self.forget = forget
        self.retain = retain
        self.forget_refusal = forget_refusal
        # In shared memory: persistent dataloader workers keep their own copy of the dataset, and must still see
        # the epoch the main process sets.
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.forget)

    def parts(self) -> list[list[TokenizedRow]]:
        """The row lists the items draw from (forget, and retain and refusal rows where present)."""
        return [rows for rows in (self.forget, self.retain, self.forget_refusal) if rows is not None]

    def __getitem__(self, index: int) -> dict[str, TokenizedRow]:
        item = {"forget": self.forget[index]}
        if self.retain is not None:
            item["retain"] = self.retain[(index + self.epoch * len(self.forget)) % len(self.retain)]
        if self.forget_refusal is not None:
            item["forget_refusal"] = self.forget_refusal[index]
        return item


class ForgetRetainCollator:
    """Pads every part of a batch (forget, retain, refusal) to one common width, right-padded, so that the parts
    can be concatenated into a single forward pass."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, TokenizedRow]]) -> dict[str, dict[str, torch.Tensor]]:
        width = max(len(row.input_ids) for item in items for row in item.values())
        batch = {}
        for part in items[0]:
            rows = [item[part] for item in items]
            input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for index, row in enumerate(rows):
                length = len(row.input_ids)
                input_ids[index, :length] = torch.tensor(row.input_ids, dtype=torch.long)
                attention_mask[index, :length] = 1
                labels[index, :length] = torch.tensor(row.labels, dtype=torch.long)
            batch[part] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return batch
