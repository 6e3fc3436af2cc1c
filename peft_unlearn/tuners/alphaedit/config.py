"""Configuration of the locate-then-edit delta adapter (AlphaEdit, with MEMIT and ROME as special cases)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ...capture import check_layer_index
from ...registration import peft_type_member
from ...tokenizer_record import TokenizerRecord
from ..options import check_integers

SOLVERS = ("alphaedit", "memit", "rome")


@dataclass
class AlphaEditConfig(PeftConfig, TokenizerRecord):
    """A low-rank weight delta on MLP output projections, written in closed form from edit requests.

    ``solver`` picks the closed form: ``"alphaedit"`` projects the update onto the null space of the preserved
    keys (Fang et al. 2025), ``"memit"`` weighs it by their covariance (Meng et al. 2023), ``"rome"`` edits one
    layer with an exact rank-one update per request (Meng et al. 2022).

    ``rank``, ``edited_key_rows`` and ``layers`` are filled in by the library (the delta's rank; rows of the
    factor of earlier edits' keys; resolved layer indices) so that a saved adapter is rebuilt with the right shapes.
    """

    solver: Literal["alphaedit", "memit", "rome"] = field(
        default="alphaedit", metadata={"help": "Closed form: 'alphaedit' (null-space), 'memit' or 'rome'."}
    )
    layers: list[int] | None = field(
        default=None,
        metadata={"help": "Decoder layers whose MLP output projection is edited; default: an early-middle band of "
                          "at least four layers (half the model when fewer; ROME the last layer of the band)."},
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Explicit module names to edit instead of `layers` (one per layer)."}
    )
    positions: Literal["subject", "answer", "subject+answer"] = field(
        default="subject+answer",
        metadata={
            "help": "Token positions whose keys are edited: 'subject' (the subject's last token, as in ROME/MEMIT), "
            "'answer' (every position that predicts a target token), or both."
        },
    )
    nullspace_threshold: float = field(
        default=1e-3,
        metadata={
            "help": "The update is projected onto the preserved keys' lowest-variance directions holding at most "
            "this fraction of their energy (trace of the second moment): the null space of AlphaEdit."
        },
    )
    l2: float = field(
        default=0.1,
        metadata={"help": "Ridge weight lambda of the closed-form solve, relative to the mean squared norm of the "
                  "keys the update can act on."},
    )
    preservation_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the preserved-key second moment in the memit/rome solve, relative to the energy "
                  "of the edited keys (1: both weigh the same)."},
    )
    rounds: int = field(
        default=1,
        metadata={"help": "Closed-form rounds per batch: each re-optimises the targets on the edited model and adds a "
                  "correction; stops early once every request reaches its target."},
    )
    refine_steps: int = field(
        default=300,
        metadata={"help": "Adam steps that fit each batch's new value factors end to end after the closed form (0: "
                  "closed form only). The closed form matches residuals at one layer, which small or entangled "
                  "models realise only in part; refinement trains the new columns of B on the target loss itself "
                  "(keys and null space unchanged) against a penalty on preserved outputs."},
    )
    refine_lr: float = field(
        default=0.2, metadata={"help": "Learning rate of the refinement, in units of the new factors' RMS."}
    )
    refine_margin: float = field(
        default=0.05,
        metadata={"help": "Per-token target NLL below which a request stops pulling during refinement, so the "
                  "penalty can shrink the update to what the targets need."},
    )
    refine_preservation: float = field(
        default=0.3,
        metadata={"help": "Weight of the refinement penalty: the change of the edited layers' outputs (the whole "
                  "delta's) on the preserved keys, and the new columns' change on the keys of earlier edits that "
                  "are not rehearsed, each relative to those outputs' energy."},
    )
    rehearse_edits: int = field(
        default=64,
        metadata={"help": "Earlier requests of this session (the most recent, at most this many) whose targets "
                  "refinement keeps reaching while it fits a new batch. Held in memory only, never saved, so "
                  "forget texts stay out of adapter files; after a reload earlier edits are kept by their saved "
                  "keys alone (0: off). A prompt edited again replaces its rehearsed earlier edit, keys included."},
    )
    v_steps: int = field(default=25, metadata={"help": "Adam steps of the target-value optimisation."})
    v_lr: float = field(
        default=0.5,
        metadata={"help": "Learning rate of the target-value optimisation, in units of the edited MLP output's RMS."},
    )
    v_weight_decay: float = field(default=1e-3, metadata={"help": "Weight decay on the residual delta (in RMS units)."})
    clamp_norm_factor: float = field(
        default=0.75, metadata={"help": "The residual delta is clamped to this multiple of the hidden state norm."}
    )
    kl_factor: float = field(
        default=0.0625, metadata={"help": "Weight of the KL term that keeps '{subject} is a' predictions unchanged."}
    )
    n_context_templates: int = field(
        default=4,
        metadata={"help": "Prompt variants (the bare prompt plus generated prefixes) keys are averaged over."},
    )
    save_projection: bool = field(
        default=False,
        metadata={"help": "Save the preserved keys' second moment (d_in x d_in floats per layer) so editing can "
                  "resume after a reload without collecting statistics again; the null space is derived again from "
                  "the moment. Earlier edits' keys are saved either way."},
    )
    rank: int = field(default=0, metadata={"help": "Rank of the delta so far (set by editing; do not change)."})
    edited_key_rows: int = field(
        default=0,
        metadata={"help": "Rows of the saved factor of earlier edits' keys, at most d_in (set by editing; do not "
                  "change)."},
    )
    n_edits: int = field(default=0, metadata={"help": "Requests applied so far (set by editing)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type_member("alphaedit")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.positions not in ("subject", "answer", "subject+answer"):
            raise ValueError(f"positions must be 'subject', 'answer' or 'subject+answer', got {self.positions!r}")
        if self.layers is not None:
            self.layers = [check_layer_index(layer, "layers") for layer in
                           ([self.layers] if isinstance(self.layers, int) else self.layers)]
            if not self.layers:
                raise ValueError("layers must not be empty")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules must not be empty: name the modules to edit, or leave it None for the "
                             "default layers")
        if self.solver == "rome" and self.layers is not None and len(self.layers) != 1:
            raise ValueError(f"the rome solver edits exactly one layer, got layers={self.layers}")
        for name in ("nullspace_threshold", "l2", "v_lr", "clamp_norm_factor", "refine_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("preservation_weight", "refine_margin", "refine_preservation", "v_weight_decay", "kl_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        check_integers(self, ("refine_steps", "rehearse_edits", "v_steps", "n_context_templates", "rounds", "rank",
                              "n_edits", "edited_key_rows"))
        for name in ("refine_steps", "rehearse_edits"):  # refine_lr, refine_margin, refine_preservation: above
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.v_steps < 1 or self.n_context_templates < 1 or self.rounds < 1:
            raise ValueError("v_steps, rounds and n_context_templates must be at least 1")
        if self.rank < 0 or self.n_edits < 0 or self.edited_key_rows < 0:
            raise ValueError("rank, n_edits and edited_key_rows must not be negative")


@dataclass
class MemitConfig(AlphaEditConfig):
    """MEMIT: the same engine with a covariance-weighted solve and no null-space projector."""

    solver: Literal["alphaedit", "memit", "rome"] = "memit"
    clamp_norm_factor: float = 4.0
    rounds: int = 3
    refine_steps: int = 0


@dataclass
class RomeConfig(AlphaEditConfig):
    """ROME: one layer, an exact rank-one update per request under the preserved-key covariance."""

    solver: Literal["alphaedit", "memit", "rome"] = "rome"
    clamp_norm_factor: float = 4.0
    positions: Literal["subject", "answer", "subject+answer"] = "subject"
    rounds: int = 1
    refine_steps: int = 0
