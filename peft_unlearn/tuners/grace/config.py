"""Configuration of the GRACE codebook adapter (Hartvigsen et al. 2023)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ...capture import check_layer_index
from ...registration import peft_type_member
from ...tokenizer_record import TokenizerRecord
from ..options import check_integers, check_numbers

# The smallest eps_init: keys this close (relative, as eps_init) are one key, a prompt edited again. A key read again
# in another batch layout or padding differs by float rounding (about 3e-7 of its norm in float32 on a small Llama):
# a radius below this could miss its own prompt in generation while teacher forcing, read in the editing batch, hit.
MIN_EPS_INIT = 1e-4


@dataclass
class GraceConfig(PeftConfig, TokenizerRecord):
    """A key-value codebook at one layer: when the layer's input at a token lies within an entry's radius of the
    entry's key, the layer's output there is replaced by the entry's trained value.

    ``codebook_size``, ``n_changes`` and ``n_edits`` are kept up to date by editing, so a saved adapter is rebuilt
    with the right shapes.
    """

    layer: int | None = field(
        default=None, metadata={"help": "Decoder layer whose MLP output projection is wrapped; default: a late layer."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Explicit module name to wrap instead of `layer` (exactly one)."}
    )
    eps_init: float = field(
        default=0.05,
        metadata={"help": "Initial radius of a new entry, as a fraction of its key's norm, or of its distance from "
                  "the mean unrelated key where that is smaller (Euclidean), or as a cosine distance: inputs that "
                  "close to an edited context count as the same context. At least 1e-4: keys closer than that are "
                  "one key, and a smaller radius can miss its own prompt read in another batch (float rounding)."},
    )
    n_iter: int = field(default=100, metadata={"help": "Optimisation steps to train the values of new entries."})
    edit_lr: float = field(
        default=1.0, metadata={"help": "Learning rate for the values, in units of the layer's output RMS."}
    )
    value_init: Literal["cold", "warm"] = field(
        default="warm", metadata={"help": "'warm': start from the layer's current output; 'cold': from random."}
    )
    replacement: Literal["last", "prompt", "all", "answer"] = field(
        default="answer",
        metadata={
            "help": "Keys and replacement. 'last', 'prompt', 'all' (GRACE's modes): one key at the last prompt "
            "token, whose value replaces the output at that token, at every token up to it, or at it and every "
            "later token; at inference the latest matching token is the key (a prompt that contains another "
            "edited prompt follows its own entry from its last token on). 'answer': one key and value per position "
            "that predicts a target token (the last prompt token and the target tokens), each replacing the output "
            "only where it matches: multi-token targets get a value per token, which one vector cannot always "
            "express."
        },
    )
    distance: Literal["euclidean", "cosine"] = field(default="euclidean", metadata={"help": "Key distance."})
    codebook_size: int = field(default=0, metadata={"help": "Entries in the codebook (set by editing)."})
    n_changes: int = field(default=0, metadata={"help": "Logged radius changes (set by editing)."})
    n_edits: int = field(default=0, metadata={"help": "Requests applied so far (set by editing)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type_member("grace")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.target_modules is not None and len(self.target_modules) != 1:
            raise ValueError(f"GRACE wraps exactly one module, got target_modules={self.target_modules}")
        if self.layer is not None:
            check_layer_index(self.layer)
        if self.value_init not in ("cold", "warm"):
            raise ValueError(f"value_init must be 'cold' or 'warm', got {self.value_init!r}")
        if self.replacement not in ("last", "prompt", "all", "answer"):
            raise ValueError(f"replacement must be 'last', 'prompt', 'all' or 'answer', got {self.replacement!r}")
        if self.distance not in ("euclidean", "cosine"):
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {self.distance!r}")
        check_integers(self, ("n_iter", "codebook_size", "n_changes", "n_edits"))
        check_numbers(self, ("eps_init", "edit_lr"))
        if not (0 < self.eps_init < math.inf and 0 < self.edit_lr < math.inf) or self.n_iter < 1:
            raise ValueError("eps_init and edit_lr must be positive finite numbers and n_iter at least 1")
        if self.eps_init < MIN_EPS_INIT:
            raise ValueError(
                f"eps_init={self.eps_init} is below {MIN_EPS_INIT}: keys closer than that count as one key, and "
                "a prompt's key read again in another batch layout differs by float rounding, so such a small radius "
                "can miss its own prompt in generation"
            )
        if min(self.codebook_size, self.n_changes, self.n_edits) < 0:
            raise ValueError("codebook_size, n_changes and n_edits must not be negative")
