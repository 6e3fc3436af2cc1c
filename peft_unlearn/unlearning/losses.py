"""Gradient-based unlearning objectives (open-unlearning definitions), registered by name.

Every objective is a forget term plus, optionally, a retain term, each a function of the model's outputs on one
paired batch (:class:`UnlearningOutputs`); the total is ``forget_weight * forget + retain_weight * retain``. A term
declares the batch parts it reads (``forget``, ``retain``, ``forget_refusal``) and the parts it needs reference
outputs for, so the trainer runs exactly the forward passes needed: one for the model and at most one for the
reference. Of the reference only per-example NLLs are kept, unless a term declares that it reads the reference's
logits (the KL term): NPO and IdkDPO hold no [rows, columns, vocabulary] reference tensor through the model's pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..losses import sequence_nll, shifted_token_logprobs
from ..requests import IGNORE_INDEX

FORGET = "forget"
RETAIN = "retain"
FORGET_REFUSAL = "forget_refusal"


@dataclass(frozen=True)
class LossCoefficients:
    """``forget_weight``/``retain_weight`` weigh the two terms; ``beta`` is the inverse temperature of NPO, SimNPO
    and DPO; ``delta`` is SimNPO's reward margin."""

    forget_weight: float = 1.0
    retain_weight: float = 1.0
    beta: float | None = None
    delta: float = 0.0


@dataclass(frozen=True)
class AccumulationWindow:
    """Sizes of the batch parts over the micro-batches of one optimizer step. Losses divide their sums by these
    sizes, so a step's objective does not depend on how its rows are split into micro-batches (gradient
    accumulation): batch 2 with no accumulation and batch 1 with 2 steps give the same update."""

    micro_batches: int
    examples: dict[str, int]
    tokens: dict[str, int]
    processes: int = 1  # > 1: the sizes are summed over the processes of a distributed run

    @classmethod
    def of(cls, batches: Sequence[dict]) -> AccumulationWindow:
        examples: dict[str, int] = {}
        tokens: dict[str, int] = {}
        for batch in batches:
            for part, inputs in batch.items():
                labels = inputs["labels"]
                examples[part] = examples.get(part, 0) + labels.shape[0]
                tokens[part] = tokens.get(part, 0) + int((labels[:, 1:] != IGNORE_INDEX).sum())
        return cls(len(batches), examples, tokens)

    def across_processes(self, accelerator) -> AccumulationWindow:
        """The sizes summed over every process of a distributed run (each process holds its own rows)."""
        parts = sorted(self.examples)
        local = torch.tensor([[self.examples[part], self.tokens[part]] for part in parts], device=accelerator.device)
        total = accelerator.gather(local[None]).sum(0).tolist()
        return AccumulationWindow(
            self.micro_batches,
            {part: int(count[0]) for part, count in zip(parts, total)},
            {part: int(count[1]) for part, count in zip(parts, total)},
            accelerator.num_processes,
        )


@dataclass(frozen=True)
class SequenceNLL:
    """Per-example summed NLL of a labelled span and its number of tokens: all that NPO and DPO read from the
    reference, kept instead of its logits."""

    total: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor, labels: torch.Tensor) -> SequenceNLL:
        return cls(sequence_nll(logits, labels, average=False), (labels[:, 1:] != IGNORE_INDEX).sum(-1))

    def value(self, average: bool) -> torch.Tensor:
        return self.total / self.tokens.clamp(min=1) if average else self.total


@dataclass
class UnlearningOutputs:
    """Logits of the trained model on the parts of one batch and, of the reference, its logits on the parts a term
    reads them on and per-example NLLs on the others, each with the labels aligned to its own columns (a model that
    cannot keep chosen positions returns every column, so the two passes may keep different ones), and the
    accumulation window the batch belongs to (None: the batch alone)."""

    logits: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    reference_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    reference_labels: dict[str, torch.Tensor] = field(default_factory=dict)
    window: AccumulationWindow | None = None
    reference_nlls: dict[str, SequenceNLL] = field(default_factory=dict)

    def nll(self, part: str, average: bool = True) -> torch.Tensor:
        """Per-example NLL of the labelled span: token mean, or the sum over tokens if not ``average``."""
        return sequence_nll(self.logits[part], self.labels[part], average=average)

    def reference_nll(self, part: str, average: bool = True) -> torch.Tensor:
        if part in self.reference_nlls:
            return self.reference_nlls[part].value(average)
        if part not in self.reference_logits:
            raise KeyError(f"the reference did not run on the {part!r} part: list it in the term's reference_parts")
        return sequence_nll(self.reference_logits[part], self.reference_labels[part], average=average)

    def scored_logits(self, part: str, reference: bool = False) -> torch.Tensor:
        """The logits that predict the part's labelled tokens, [tokens, vocabulary] in row and column order: the
        same tokens in the same order for the model and the reference, whichever columns each pass kept."""
        if reference and part not in self.reference_logits:
            raise KeyError(f"the reference's logits on the {part!r} part were not kept (only its NLLs): declare "
                           "LossTerm(..., reference_logits=True) for a term that reads them")
        logits = (self.reference_logits if reference else self.logits)[part]
        labels = (self.reference_labels if reference else self.labels)[part]
        return logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]

    def example_mean(self, part: str, values: torch.Tensor) -> torch.Tensor:
        """The mean of per-example ``values`` over the examples of the part in the window."""
        count = self.window.examples[part] if self.window is not None else values.shape[0]
        return values.sum() / max(count, 1)

    def token_mean(self, part: str, total: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``total`` (a sum over this batch's labelled tokens, ``mask``) divided by the part's tokens in the window."""
        count = self.window.tokens[part] if self.window is not None else int(mask.sum())
        return total / max(count, 1)

    def token_nll(self, part: str) -> torch.Tensor:
        """Mean NLL over every labelled token of the part (the usual causal-LM loss)."""
        logprobs, mask = shifted_token_logprobs(self.logits[part], self.labels[part])
        return self.token_mean(part, -logprobs.sum(), mask)


LossFunction = Callable[[UnlearningOutputs, LossCoefficients], torch.Tensor]


@dataclass(frozen=True)
class LossTerm:
    """One term: its function, the parts it reads from the model, and those it reads from the reference: their
    per-example NLLs (``reference_nll``), and their logits too if ``reference_logits`` (``scored_logits``)."""

    compute: LossFunction
    parts: tuple[str, ...]
    reference_parts: tuple[str, ...] = ()
    reference_logits: bool = False


@dataclass(frozen=True)
class UnlearningLoss:
    """A named objective: a forget term and an optional retain term. ``default_beta`` is None for objectives
    without a temperature."""

    name: str
    forget: LossTerm
    retain: LossTerm | None = None
    default_beta: float | None = None

    def terms(self, with_retain: bool) -> list[LossTerm]:
        return [self.forget] + ([self.retain] if with_retain and self.retain is not None else [])

    def parts(self, with_retain: bool) -> tuple[str, ...]:
        """Batch parts the model runs on, in a fixed order."""
        return tuple(dict.fromkeys(part for term in self.terms(with_retain) for part in term.parts))

    def reference_parts(self, with_retain: bool) -> tuple[str, ...]:
        """Batch parts the reference model runs on (empty: no reference needed)."""
        return tuple(dict.fromkeys(part for term in self.terms(with_retain) for part in term.reference_parts))

    def reference_logit_parts(self, with_retain: bool) -> tuple[str, ...]:
        """Reference parts whose logits a term reads (of the others only per-example NLLs are kept)."""
        return tuple(dict.fromkeys(
            part for term in self.terms(with_retain) if term.reference_logits for part in term.reference_parts
        ))

    @property
    def uses_retain(self) -> bool:
        return self.retain is not None

    def reads_retain_set(self, retain_weight: float) -> bool:
        """Whether training with this objective at ``retain_weight`` needs a retain set (0 skips the term)."""
        return self.uses_retain and retain_weight > 0

    @property
    def uses_refusals(self) -> bool:
        return any(FORGET_REFUSAL in term.parts for term in self.terms(True))

    def __call__(
        self, outputs: UnlearningOutputs, coefficients: LossCoefficients, with_retain: bool
    ) -> dict[str, torch.Tensor]:
        """``{"loss": total, "forget_loss": ..., ["retain_loss": ...]}``; only ``loss`` carries gradients."""
        forget_loss = self.forget.compute(outputs, coefficients)
        total = coefficients.forget_weight * forget_loss
        terms = {"forget_loss": forget_loss.detach()}
        if with_retain and self.retain is not None:
            retain_loss = self.retain.compute(outputs, coefficients)
            total = total + coefficients.retain_weight * retain_loss
            terms["retain_loss"] = retain_loss.detach()
        return {"loss": total, **terms}


UNLEARNING_LOSSES: dict[str, UnlearningLoss] = {}


def register_unlearning_loss(loss: UnlearningLoss) -> UnlearningLoss:
    """Make ``loss`` available to :class:`UnlearningArguments` under ``loss.name`` (replacing a same-named one)."""
    UNLEARNING_LOSSES[loss.name] = loss
    return loss


def get_unlearning_loss(name: str) -> UnlearningLoss:
    if name not in UNLEARNING_LOSSES:
        raise ValueError(f"unknown unlearning loss {name!r}; choose one of {sorted(UNLEARNING_LOSSES)}")
    return UNLEARNING_LOSSES[name]


def _beta(coefficients: LossCoefficients) -> float:
    if coefficients.beta is None or coefficients.beta <= 0:
        raise ValueError(f"this loss needs beta > 0, got {coefficients.beta}")
    return coefficients.beta


# --- forget terms ---------------------------------------------------------------------------------------------------


def gradient_ascent(outputs: UnlearningOutputs, coefficients: LossCoefficients) -> torch.Tensor:
    """-NLL of the forget answers: push their likelihood down without bound."""
    return -outputs.token_nll(FORGET)


def negative_preference(outputs: UnlearningOutputs, coefficients: LossCoefficients) -> torch.Tensor:
    """NPO (Zhang et al. 2024): ``-(2/beta) log sigmoid(beta (NLL - NLL_ref))`` with summed-token sequence NLLs,
    i.e. ``-(2/beta) log sigmoid(-beta log(pi/pi_ref))``. It equals ``(2/beta) log 2`` while the model matches the
    reference and goes to 0 as the forget answers become unlikely, so it decays instead of diverging like GA."""
    beta = _beta(coefficients)
    log_ratio = outputs.nll(FORGET, average=False) - outputs.reference_nll(FORGET, average=False)
    return outputs.example_mean(FORGET, -(2.0 / beta) * F.logsigmoid(beta * log_ratio))


def simple_negative_preference(outputs: UnlearningOutputs, coefficients: LossCoefficients) -> torch.Tensor:
    """SimNPO (Fan et al. 2024): ``-(2/beta) log sigmoid(beta (NLL/|y| - delta))``: length-normalised NLL and no
    reference model (open-unlearning's form; the paper's margin gamma is ``beta * delta``)."""
    beta = _beta(coefficients)
    return outputs.example_mean(FORGET, -(2.0 / beta) * F.logsigmoid(beta * (outputs.nll(FORGET) - coefficients.delta)))


def refusal_preference(outputs: UnlearningOutputs, coefficients: LossCoefficients) -> torch.Tensor:
    """IdkDPO: DPO with the refusal as the preferred answer and the forget answer as the rejected one,
    ``-(2/beta) log sigmoid(beta (log-ratio_refusal - log-ratio_forget))`` (open-unlearning's scaling)."""
    beta = _beta(coefficients)
    preferred = outputs.reference_nll(FORGET_REFUSAL, average=False) - outputs.nll(FORGET_REFUSAL, average=False)
    rejected = outputs.reference_nll(FORGET, average=False) - outputs.nll(FORGET, average=False)
    return outputs.example_mean(FORGET, -(2.0 / beta) * F.logsigmoid(beta * (preferred - rejected)))


def refusal_nll(outputs: UnlearningOutputs, coefficients: LossCoefficients) -> torch.Tensor:
    """Plain NLL toward a refusal on the forget questions."""
    return outputs.token_nll(FORGET_REFUSAL)


# --- retain terms ---------------------------------------------------------------------------------------------------


def retain_nll(outputs: UnlearningOutputs, coefficients: LossCoefficients) -> torch.Tensor:
    return outputs.token_nll(RETAIN)


def retain_kl(outputs: UnlearningOutputs, coefficients: LossCoefficients) -> torch.Tensor:
    """KL(reference || model) of the next-token distributions, averaged over the retain answer tokens."""
    logits = outputs.scored_logits(RETAIN).float()
    reference = outputs.scored_logits(RETAIN, reference=True).float()
    kl = F.kl_div(torch.log_softmax(logits, dim=-1), torch.log_softmax(reference, dim=-1), log_target=True,
                  reduction="sum")
    return outputs.token_mean(RETAIN, kl, outputs.labels[RETAIN][:, 1:] != IGNORE_INDEX)


RETAIN_NLL = LossTerm(retain_nll, (RETAIN,))
RETAIN_KL = LossTerm(retain_kl, (RETAIN,), (RETAIN,), reference_logits=True)

for _loss in (
    UnlearningLoss("ga", LossTerm(gradient_ascent, (FORGET,))),
    UnlearningLoss("grad_diff", LossTerm(gradient_ascent, (FORGET,)), RETAIN_NLL),
    UnlearningLoss("kl", LossTerm(gradient_ascent, (FORGET,)), RETAIN_KL),
    UnlearningLoss("npo", LossTerm(negative_preference, (FORGET,), (FORGET,)), RETAIN_NLL, default_beta=0.1),
    UnlearningLoss("simnpo", LossTerm(simple_negative_preference, (FORGET,)), RETAIN_NLL, default_beta=4.5),
    UnlearningLoss(
        "idk_dpo",
        LossTerm(refusal_preference, (FORGET, FORGET_REFUSAL), (FORGET, FORGET_REFUSAL)),
        RETAIN_NLL,
        default_beta=0.1,
    ),
    UnlearningLoss("refusal", LossTerm(refusal_nll, (FORGET_REFUSAL,)), RETAIN_NLL),
):
    register_unlearning_loss(_loss)
