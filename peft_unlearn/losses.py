"""Token-level scoring shared by editing objectives, unlearning losses and metrics.

All functions take logits [B, T, V] and transformers-style labels [B, T] (aligned with the input ids, ``-100``
outside the scored span) and do the one-position shift themselves.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .capture import check_fits_context, unwrap_model
from .requests import IGNORE_INDEX


def shifted_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label token given its prefix, and the mask of scored positions ([B, T-1] each)."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return logprobs * mask, mask


def labelled_logits(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over each row's own labelled span (from the column that predicts its first labelled token
    to its last labelled one), the rows' spans aligned in one narrow tensor: what :func:`sequence_nll` and
    :func:`per_example_accuracy` read, without the vocabulary projection and its gradient at prompt columns
    (float32 [rows, columns, vocabulary] tensors dominate memory for long prompts and large vocabularies).
    Models that cannot keep chosen positions (``logits_to_keep``) return every column. ``width`` (at least
    :func:`labelled_width` of ``labels``) fixes the number of columns, so that passes over different rows align."""
    check_fits_context(model, labels.shape[1], "the texts (prompt and answer)")
    scored = labels[:, 1:] != IGNORE_INDEX  # column p predicts the label at p + 1
    if not bool(scored.any()) or not _keeps_positions(model):
        return model(**inputs).logits, labels
    first, last = _labelled_columns(scored)
    width = max(width or 0, int((last - first).max()) + 2)  # the span's columns and the one more the shift reads
    positions = first[:, None] + torch.arange(width, device=labels.device)
    inside = positions < labels.shape[1]
    positions = positions.clamp(max=labels.shape[1] - 1)
    logits = model(**inputs, logits_to_keep=positions).logits
    if logits.shape[:2] != positions.shape:  # a model that keeps positions its own way
        return model(**inputs).logits, labels
    kept = labels.gather(1, positions).masked_fill(~inside, IGNORE_INDEX)
    kept[:, 0] = IGNORE_INDEX  # the span's first column is read only as a prediction
    return logits, kept


def logits_at(model: nn.Module, inputs: Mapping[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """The logits at one position per row, [B, V], without projecting the other positions onto the vocabulary
    where the model can keep chosen positions."""
    rows = torch.arange(positions.shape[0], device=positions.device)
    if _keeps_positions(model):
        logits = model(**inputs, logits_to_keep=positions[:, None]).logits
        if logits.shape[:2] == (positions.shape[0], 1):
            return logits[:, 0]
    return model(**inputs).logits[rows, positions]


# Float32 logits one training forward may hold ([rows, labelled columns, vocabulary]); larger batches run in row
# chunks whose gradients add up (512 MiB per tensor; the log-softmax and the gradient take as much again each).
LOGIT_BUDGET = 2**27


def row_chunks(model: nn.Module, labels: torch.Tensor) -> list[torch.Tensor | None]:
    """Groups of rows whose labelled logits fit :data:`LOGIT_BUDGET` elements, or ``[None]`` when the whole batch
    does: a loss summed over rows, accumulated chunk by chunk, has the same gradient, and memory stays bounded for
    many requests and large vocabularies."""
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    vocabulary = head.weight.shape[0] if head is not None else getattr(getattr(base, "config", None), "vocab_size", 0)
    per_row = labelled_width(labels) * max(int(vocabulary or 0), 1)
    size = max(1, LOGIT_BUDGET // per_row)
    if size >= labels.shape[0]:
        return [None]
    return list(torch.arange(labels.shape[0], device=labels.device).split(size))


def labelled_width(labels: torch.Tensor) -> int:
    """The number of columns :func:`labelled_logits` keeps for ``labels``."""
    scored = labels[:, 1:] != IGNORE_INDEX
    if not bool(scored.any()):
        return labels.shape[1]
    first, last = _labelled_columns(scored)
    return int((last - first).max()) + 2


def _labelled_columns(scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first and last column that predicts a labelled token (a row without labels: the last column)."""
    columns = torch.arange(scored.shape[1], device=scored.device)
    first = torch.where(scored, columns, scored.shape[1] - 1).min(dim=1).values
    last = torch.where(scored, columns, first[:, None]).max(dim=1).values
    return first, last


def _keeps_positions(model: nn.Module) -> bool:
    """Whether the model's forward takes per-row ``logits_to_keep`` positions (transformers' shared slicing)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401  (per-row positions, 2-D)
    except ImportError:
        return False
    while isinstance(getattr(model, "module", None), nn.Module):  # DDP / DeepSpeed wrappers pass keywords through
        model = model.module
    return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor, average: bool = True) -> torch.Tensor:
    """Per-example negative log-likelihood of the labelled span: mean over tokens, or the sum if not ``average``."""
    logprobs, mask = shifted_token_logprobs(logits, labels)
    total = -logprobs.sum(-1)
    if not average:
        return total
    return total / mask.sum(-1).clamp(min=1)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over every labelled token of the batch (the usual causal-LM loss)."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def per_example_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forced fraction of labelled tokens that the argmax predicts, per example."""
    return predicted_accuracy(logits[:, :-1].argmax(-1), labels)


def predicted_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`per_example_accuracy` from the argmax tokens ([B, T-1], as :func:`label_token_scores` gives them)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    correct = (predicted == targets) & mask
    return correct.sum(-1).float() / mask.sum(-1).clamp(min=1)


# Logit elements label_token_scores reads per step: on CPU 2 MiB of float32, which stays in cache; an accelerator
# pays per kernel launch and has bandwidth to spare, so it takes 256 MiB steps.
CPU_SCORING_STEP = 2**19
ACCELERATOR_SCORING_STEP = 2**26


def label_token_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Without gradients: the log-probability of each label token given its prefix and the argmax token there
    ([B, T-1] each, 0 at unscored positions), and the mask of scored positions.

    The same values as :func:`shifted_token_logprobs` and ``logits[:, :-1].argmax(-1)``, computed over each row's
    labelled span a few positions at a time: a log-softmax of the whole tensor allocates another float32 [B, T, V]
    tensor (GBs for a large vocabulary) and spends its time on padding columns and on memory traffic.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)
    logprobs = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    predicted = torch.zeros(mask.shape, dtype=torch.long, device=logits.device)
    budget = CPU_SCORING_STEP if logits.device.type == "cpu" else ACCELERATOR_SCORING_STEP
    step = max(1, budget // logits.shape[-1])
    first, last = _labelled_columns(mask)
    for row, (begin, end) in enumerate(zip(first.tolist(), (last + 1).tolist())):
        for start in range(begin, end, step):
            stop = min(start + step, end)
            chunk = logits[row, start:stop].float()
            predicted[row, start:stop] = chunk.max(dim=-1).indices  # the first maximum, as argmax; faster on CPU
            logprobs[row, start:stop] = torch.log_softmax(chunk, dim=-1).gather(
                -1, safe_targets[row, start:stop, None]
            ).squeeze(-1)
    return logprobs.masked_fill_(~mask, 0.0), predicted.masked_fill_(~mask, 0), mask
