"""Configuration of the UIPE-extrapolated LoRA adapter (Wang, Zhang et al. 2025, arXiv 2503.04693)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from peft import LoraConfig

from ...registration import peft_type_member
from ...tokenizer_record import TokenizerRecord


def check_extrapolation_alpha(alpha: float) -> float:
    """UIPE scales the unlearning update by ``1 + alpha``; a negative alpha would undo the update instead."""
    # numbers.Real: a numpy float (an alpha read from an array or a sweep) is a number too, stored as a float.
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"extrapolation_alpha must be a finite number, got {alpha!r}")
    if alpha < 0:
        raise ValueError(
            f"extrapolation_alpha must be >= 0 (the update is applied as (1 + alpha) times the trained one), "
            f"got {alpha}"
        )
    return float(alpha)


# PEFT's task models that add their heads to the config's modules_to_save.
TASKS_WITH_TRAINED_HEADS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")

# LoRA initialisations that subtract the adapter's starting update from the base weight.
RESIDUAL_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def check_no_full_copies(config: LoraConfig) -> None:
    """modules_to_save and trainable_token_indices train full copies whose update the factor would not reach.

    Checked again when the adapter is injected: PEFT's classification and question-answering models add their heads
    to ``modules_to_save`` after the config was made, and the saved config then failed to load."""
    if config.modules_to_save or getattr(config, "trainable_token_indices", None):
        task = str(getattr(config.task_type, "value", config.task_type))
        added = f" (task_type={task} adds its head to modules_to_save)" if task in TASKS_WITH_TRAINED_HEADS else ""
        raise ValueError(
            "UIPELoraConfig extrapolates LoRA updates only: modules_to_save and trainable_token_indices train "
            f"full copies whose update the factor would not reach{added}; leave them unset"
        )


def check_no_residual_init(init_lora_weights: bool | str) -> None:
    """Initialisations that move part of the base weight into the adapter (PiSSA, CorDA, OLoRA, LoftQ, LoRA-GA)
    start from a non-zero update ``s B0 A0`` taken out of the base weight: the trained update is then
    ``s (B A - B0 A0)``, and scaling the adapter by ``1 + alpha`` adds ``alpha s B0 A0`` too much."""
    if isinstance(init_lora_weights, str) and init_lora_weights.lower().startswith(RESIDUAL_INITS):
        raise ValueError(
            f"UIPELoraConfig does not support init_lora_weights={init_lora_weights!r}: it moves part of the base "
            "weight into the adapter, whose starting update is then not zero, so scaling the adapter by 1 + alpha "
            "does not give theta_init + (1 + alpha) v; use the default init_lora_weights=True or 'gaussian'"
        )


@dataclass
class UIPELoraConfig(LoraConfig, TokenizerRecord):
    """A LoRA adapter whose update is applied as ``(1 + extrapolation_alpha)`` times the trained LoRA update.

    UIPE extrapolates an unlearning update ``v = theta_unlearned - theta_init`` to ``theta_init + (1 + alpha) v``;
    on a LoRA adapter ``v`` is the adapter's update, so the factor multiplies the adapter's scaling. Train with
    ``extrapolation_alpha=0`` (plain LoRA), then raise it with :func:`extrapolate` without retraining.
    """

    extrapolation_alpha: float = field(
        default=0.0,
        metadata={"help": "UIPE factor: the adapter applies (1 + extrapolation_alpha) times its trained update."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type_member("uipe_lora")
        self.extrapolation_alpha = check_extrapolation_alpha(self.extrapolation_alpha)
        check_no_full_copies(self)
        if self.bias != "none":
            raise ValueError(
                f"UIPELoraConfig extrapolates LoRA updates only: bias={self.bias!r} trains the base model's biases in "
                "place, and the factor would not reach their update (theta_init + (1 + alpha) v would leave the "
                "biases' part of v unscaled); use bias='none' (lora_bias=True gives the adapter a bias it scales)"
            )
        check_no_residual_init(self.init_lora_weights)
        if self.use_dora:
            raise ValueError(
                "UIPELoraConfig does not support use_dora=True: DoRA's update is not linear in the LoRA scaling (its "
                "magnitude vector is trained too, and the direction is renormalised), so scaling the adapter by "
                "1 + alpha does not give theta_init + (1 + alpha) v; use plain LoRA"
            )
