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

from .capture import unwrap_model
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
    model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over the columns from the one that predicts the first labelled token to the last
    labelled one: what :func:`sequence_nll` reads, without the vocabulary projection and its gradient at prompt
    columns (as costly as a decoder layer in small models, more with large vocabularies). Models whose forward
    takes no ``logits_to_keep`` return every column."""
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    forward = inspect.signature(unwrap_model(model).forward).parameters
    if not len(labelled) or "logits_to_keep" not in forward:
        return model(**inputs).logits, labels
    start, end = max(int(labelled[0]) - 1, 0), int(labelled[-1]) + 1
    keep = torch.arange(start, end, device=labels.device)
    return model(**inputs, logits_to_keep=keep).logits, labels[:, start:end]


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
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    correct = (logits[:, :-1].argmax(-1) == targets) & mask
    return correct.sum(-1).float() / mask.sum(-1).clamp(min=1)
