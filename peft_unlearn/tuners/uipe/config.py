"""Configuration of the UIPE-extrapolated LoRA adapter (Wang, Zhang et al. 2025, arXiv 2503.04693)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peft import LoraConfig

from ...registration import peft_type_member
from ...tokenizer_record import TokenizerRecord


def check_extrapolation_alpha(alpha: float) -> float:
    """UIPE scales the unlearning update by ``1 + alpha``; a negative alpha would undo the update instead."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"extrapolation_alpha must be a finite number, got {alpha!r}")
    if alpha < 0:
        raise ValueError(
            f"extrapolation_alpha must be >= 0 (the update is applied as (1 + alpha) times the trained one), "
            f"got {alpha}"
        )
    return float(alpha)


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
        if self.modules_to_save or getattr(self, "trainable_token_indices", None):
            raise ValueError(
                "UIPELoraConfig extrapolates LoRA updates only: modules_to_save and trainable_token_indices train "
                "full copies whose update the factor would not reach; leave them unset"
            )
        if self.bias != "none":
            raise ValueError(
                f"UIPELoraConfig extrapolates LoRA updates only: bias={self.bias!r} trains the base model's biases in "
                "place, and the factor would not reach their update (theta_init + (1 + alpha) v would leave the "
                "biases' part of v unscaled); use bias='none' (lora_bias=True gives the adapter a bias it scales)"
            )
        if self.use_dora:
            raise ValueError(
                "UIPELoraConfig does not support use_dora=True: DoRA's update is not linear in the LoRA scaling (its "
                "magnitude vector is trained too, and the direction is renormalised), so scaling the adapter by "
                "1 + alpha does not give theta_init + (1 + alpha) v; use plain LoRA"
            )
