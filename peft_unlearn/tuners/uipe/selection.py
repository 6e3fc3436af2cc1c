"""Automatic choice of the UIPE factor: the paper picks alpha by hand; here it is the most forgetting alpha whose
retain accuracy stays above a floor relative to the model before unlearning."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from peft import PeftModel
from tqdm.auto import tqdm

from ...editing import adapters_disabled
from ...metrics import answer_accuracy
from .config import check_extrapolation_alpha
from .layer import lora_layers
from .model import extrapolate, uipe_adapter

logger = logging.getLogger(__name__)

DEFAULT_ALPHA_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class AlphaScore:
    """Teacher-forced answer accuracies measured at one alpha."""

    alpha: float
    forget_accuracy: float
    retain_accuracy: float
    meets_floor: bool


@dataclass
class AlphaSelection:
    """The chosen alpha, the per-alpha table it was chosen from, and the retain accuracy it was held against."""

    alpha: float
    table: list[AlphaScore] = field(default_factory=list)
    retain_before: float = 0.0
    utility_floor: float = 0.95

    def score(self, alpha: float) -> AlphaScore:
        """The table row of ``alpha``."""
        for row in self.table:
            if row.alpha == alpha:
                return row
        raise KeyError(f"alpha {alpha} was not measured; the grid was {[row.alpha for row in self.table]}")


def check_utility_floor(utility_floor: float) -> float:
    """The share of the retain accuracy an extrapolation must keep: in (0, 1]."""
    if isinstance(utility_floor, bool) or not isinstance(utility_floor, (int, float)) or not 0 < utility_floor <= 1:
        raise ValueError(f"utility_floor must be a number in (0, 1], got {utility_floor!r}")
    return utility_floor


def select_alpha(
    model: PeftModel,
    tokenizer,
    forget: Sequence[tuple[str, str]],
    retain: Sequence[tuple[str, str]],
    utility_floor: float = 0.95,
    grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    *,
    adapter_name: str | None = None,
    batch_size: int = 64,
    chat_template: bool = False,
    progress: bool = True,
) -> AlphaSelection:
    """Extrapolate the UIPE adapter to every alpha of ``grid`` (0 is always included) and keep the one with the
    lowest forget answer accuracy among those whose retain answer accuracy is at least ``utility_floor`` times the
    retain accuracy before unlearning (the adapter disabled); ties go to the smaller alpha.

    The model is left extrapolated with the chosen alpha (a selection that fails leaves the alpha it had). If no
    alpha keeps the floor, alpha 0 (no extrapolation) is chosen and a warning says so: extrapolation cannot repair
    an adapter that already costs too much utility.
    """
    forget, retain = list(forget), list(retain)
    if not forget:
        raise ValueError("forget is empty: give the (question, answer) pairs that should be forgotten")
    if not retain:
        raise ValueError("retain is empty: give (question, answer) pairs whose accuracy must be kept")
    check_utility_floor(utility_floor)
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Iterable):
        # grid=1.0 failed with a bare "'float' object is not iterable"
        raise ValueError(f"grid must be a sequence of alphas >= 0 (e.g. (0.5, 1.0)), got {grid!r}")
    alphas = sorted({0.0, *(check_extrapolation_alpha(alpha) for alpha in grid)})
    adapter_name, config = uipe_adapter(model, adapter_name)
    original_alpha = config.extrapolation_alpha
    active = list(model.active_adapters)
    if adapter_name not in active:
        # The accuracies are measured through the active adapters: every alpha of another one scores the same, and
        # alpha 0 was chosen silently.
        raise ValueError(
            f"select_alpha measures the model through its active adapters ({active}), which leave out "
            f"{adapter_name!r}: call model.set_adapter({adapter_name!r}) first"
        )

    if any(layer.disable_adapters for _, layer in lora_layers(model, adapter_name)):
        # Inside model.disable_adapter() every alpha scored as the base model, and alpha 0 was chosen silently.
        raise ValueError(
            f"adapter {adapter_name!r} is disabled (inside `with model.disable_adapter():` or after "
            "`disable_adapter_layers()`): every alpha would score as the base model; call select_alpha outside it"
        )

    def accuracy(pairs):
        return answer_accuracy(model, tokenizer, pairs, batch_size=batch_size, chat_template=chat_template)

    # Not model.disable_adapter(): re-enabling marks the adapter trainable, and an adapter loaded for inference
    # was left with its weights requiring grad.
    with adapters_disabled(model):
        retain_before = accuracy(retain)
    threshold = utility_floor * retain_before
    table = []
    try:
        for alpha in tqdm(alphas, desc="UIPE alpha grid", disable=not progress, leave=False):
            extrapolate(model, alpha, adapter_name)
            retain_accuracy = accuracy(retain)
            table.append(AlphaScore(alpha, accuracy(forget), retain_accuracy, retain_accuracy >= threshold))
            logger.info("alpha %.3g: forget accuracy %.3f, retain accuracy %.3f", alpha, table[-1].forget_accuracy,
                        retain_accuracy)
    except BaseException:
        # A failed or interrupted selection would leave the adapter at whichever grid alpha it had reached.
        extrapolate(model, original_alpha, adapter_name)
        raise

    admissible = [row for row in table if row.meets_floor]
    if admissible:
        chosen = min(admissible, key=lambda row: (row.forget_accuracy, row.alpha)).alpha
    else:
        logger.warning(
            "no alpha keeps retain accuracy >= %.3f (%.2f x %.3f before unlearning); keeping alpha 0",
            threshold, utility_floor, retain_before,
        )
        chosen = 0.0
    extrapolate(model, chosen, adapter_name)
    return AlphaSelection(alpha=chosen, table=table, retain_before=retain_before, utility_floor=utility_floor)
