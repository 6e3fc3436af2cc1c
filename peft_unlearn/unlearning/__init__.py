"""Gradient-based unlearning through a ``transformers.Trainer`` (open-unlearning objectives)."""

from .data import ForgetRetainCollator, ForgetRetainDataset
from .localization import (
    MaskedGradients,
    mask_overlap,
    parameter_masks,
    restrict_to_masks,
    unrestricted_masks,
)
from .losses import (
    UNLEARNING_LOSSES,
    LossCoefficients,
    LossTerm,
    UnlearningLoss,
    UnlearningOutputs,
    get_unlearning_loss,
    register_unlearning_loss,
)
from .recipes import unlearn_with_lora
from .trainer import UnlearningArguments, UnlearningTrainer

__all__ = [
    "UNLEARNING_LOSSES",
    "ForgetRetainCollator",
    "ForgetRetainDataset",
    "LossCoefficients",
    "LossTerm",
    "MaskedGradients",
    "UnlearningArguments",
    "UnlearningLoss",
    "UnlearningOutputs",
    "UnlearningTrainer",
    "get_unlearning_loss",
    "mask_overlap",
    "parameter_masks",
    "register_unlearning_loss",
    "restrict_to_masks",
    "unlearn_with_lora",
    "unrestricted_masks",
]
