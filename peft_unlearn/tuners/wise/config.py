"""Configuration of the WISE side-memory adapter (Wang et al. 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ...capture import check_layer_index
from ...registration import peft_type_member
from ...tokenizer_record import TokenizerRecord
from ..options import check_integers, check_numbers

MERGE_METHODS = ("ties", "dare_ties", "linear")


@dataclass
class WiseConfig(PeftConfig, TokenizerRecord):
    """A side memory (a trainable copy of one MLP output projection) that edits are written into, and a router
    that sends a sequence to it only when the side memory reacts strongly to the sequence's tokens.

    Activation scores are relative: ``||(W_side - W) x|| / ||W x + b||`` per token, the maximum over a sequence's
    tokens, so the margins ``alpha``, ``beta``, ``gamma`` carry across model sizes. ``n_memories``,
    ``n_edits`` and ``shard_edits`` are kept up to date by editing so a saved adapter reloads with its shapes.
    """

    layer: int | None = field(
        default=None, metadata={"help": "Decoder layer whose MLP output projection gets a side memory; default: "
                                "a mid-late layer."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Explicit module name instead of `layer` (exactly one)."}
    )
    lr: float = field(
        default=0.5, metadata={"help": "Adam learning rate on the side memory, in units of the weight's RMS."}
    )
    n_iter: int = field(default=100, metadata={"help": "Training steps per edit batch (stops early when done)."})
    act_ratio: float = field(
        default=0.5, metadata={"help": "Routing threshold = smallest in-scope score of a memory x act_ratio."}
    )
    alpha: float = field(default=0.1, metadata={"help": "Margin: unrelated prompts must score below alpha."})
    beta: float = field(default=1.0, metadata={"help": "Margin: edit prompts must score above beta."})
    gamma: float = field(default=0.5, metadata={"help": "Margin: edit prompts must outscore unrelated by gamma."})
    mask_ratio: float = field(
        default=0.5,
        metadata={"help": "Fraction of side-memory entries a shard may change (random mask per shard); the paper's "
                  "0.2 leaves too little room in small layers."},
    )
    shard_size: int = field(default=50, metadata={"help": "Edits per knowledge shard before it is merged/stored."})
    merge: Literal["ties", "dare_ties", "linear"] = field(
        default="ties", metadata={"help": "How finished shards are merged (PEFT's merge_utils)."}
    )
    merge_density: float = field(default=0.5, metadata={"help": "Density kept by TIES/DARE merging."})
    retrieve: bool = field(
        default=False,
        metadata={"help": "Keep every finished shard as its own side memory and route to the most activated one."},
    )
    rehearse_edits: int = field(
        default=50,
        metadata={"help": "Each call trains the side memory again on up to this many of the unfinished shard's "
                  "earlier requests edited in this session (their texts stay in memory, never in saved files): "
                  "one edit per call otherwise overwrites the earlier ones (50 refusal edits one per call on the "
                  "llama fact model: 0.06 held, 0.66 with rehearsal, at a quarter of the speed). 0 turns it off."},
    )
    norm_constraint: float = field(
        default=1.0, metadata={"help": "Side-memory entries stay within +/- this of the original weights."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the shard masks and of sampled unrelated prompts."})
    n_memories: int = field(default=0, metadata={"help": "Finished side memories stored (set by editing)."})
    n_edits: int = field(default=0, metadata={"help": "Requests applied so far (set by editing)."})
    shard_edits: int = field(default=0, metadata={"help": "Edits in the unfinished shard (set by editing)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type_member("wise")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.target_modules is not None and len(self.target_modules) != 1:
            raise ValueError(f"WISE wraps exactly one module, got target_modules={self.target_modules}")
        if self.layer is not None:
            check_layer_index(self.layer)
        if self.merge not in MERGE_METHODS:
            raise ValueError(f"merge must be one of {MERGE_METHODS}, got {self.merge!r}")
        check_integers(self, ("n_iter", "shard_size", "seed", "n_memories", "n_edits", "shard_edits"))
        check_numbers(self, ("mask_ratio", "merge_density", "act_ratio", "lr", "norm_constraint", "alpha", "beta",
                             "gamma"))
        if not 0 < self.mask_ratio <= 1 or not 0 < self.merge_density <= 1:
            raise ValueError("mask_ratio and merge_density must be in (0, 1]")
        if not 0 < self.act_ratio <= 1:
            raise ValueError("act_ratio must be in (0, 1]")
        finite_positive = 0 < self.lr < math.inf and 0 < self.norm_constraint < math.inf
        if not finite_positive or self.n_iter < 1 or self.shard_size < 1:
            raise ValueError("lr and norm_constraint must be positive finite numbers; n_iter and shard_size at least 1")
        if not all(0 <= margin < math.inf for margin in (self.alpha, self.beta, self.gamma)):
            raise ValueError(f"the margins alpha, beta, gamma must be finite and >= 0, got "
                             f"{self.alpha}, {self.beta}, {self.gamma}")
        if isinstance(self.rehearse_edits, bool) or not isinstance(self.rehearse_edits, int) or self.rehearse_edits < 0:
            raise ValueError(f"rehearse_edits must be a non-negative integer, got {self.rehearse_edits!r}")
        if min(self.n_memories, self.n_edits, self.shard_edits) < 0:
            raise ValueError("n_memories, n_edits and shard_edits must not be negative")
        if self.shard_edits >= self.shard_size:
            raise ValueError(f"shard_edits ({self.shard_edits}) must be below shard_size ({self.shard_size}): a full "
                             "shard is stored as soon as it fills")
