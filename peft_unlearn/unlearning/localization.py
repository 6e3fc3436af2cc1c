"""Localized unlearning: choose a region of the weights from the forget set, then let a gradient unlearning loss
move only that region.

:func:`parameter_masks` scores every element of the decoder blocks' linear weights by one rule and keeps the top
``fraction`` of each tensor, so every rule selects the same number of elements per tensor and rules can be compared
at an equal budget. :func:`restrict_to_masks` (or ``UnlearningTrainer(parameter_masks=...)``) then zeroes the
gradients outside the masks, so training moves the masked elements and nothing else.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D
from typing_extensions import Self

from ..capture import capture_at_positions, check_fits_context, decoder_layers_path, unwrap_model
from ..losses import labelled_logits, sequence_nll
from ..metrics import batches, evaluating, model_device
from ..requests import IGNORE_INDEX, pad_token_id
from .data import ForgetRetainCollator, TokenizedRow, as_rows, row_format, tokenize_rows

logger = logging.getLogger(__name__)

RULES = ("activation", "gradient", "random")


def _adapter_factors(model: nn.Module) -> set[int]:
    """Ids of the modules holding PEFT adapter weights (LoRA's ``lora_A``/``lora_B``, ...) in the tuner layers."""
    factors = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                factors.update(id(factor) for factor in getattr(module, layer_name).modules())
    return factors


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers (``nn.Linear`` or GPT-2 ``Conv1D``) inside the decoder blocks whose weight requires grad,
    by module name in ``model``: the attention and MLP projections, never embeddings, norms or the LM head.

    An adapter's factors (LoRA's ``lora_A``/``lora_B``) are linear layers too, but no rule scores them: at
    initialisation ``B = 0``, so every ``|B| * RMS`` and every gradient of ``A`` is 0 and their masks would be
    arbitrary."""
    layers = unwrap_model(model).get_submodule(decoder_layers_path(model))
    inside = {id(module) for module in layers.modules()} - _adapter_factors(model)
    return {
        name: module
        for name, module in model.named_modules()
        if id(module) in inside
        and isinstance(module, (nn.Linear, Conv1D))
        and module.weight.dim() == 2
        and module.weight.requires_grad
    }


def mask_size(numel: int, fraction: float) -> int:
    """Elements a mask of ``fraction`` keeps in a tensor of ``numel`` elements (at least one)."""
    return max(1, round(fraction * numel))


def _top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the ``mask_size`` highest scores (exactly that many, ties broken by ``topk``)."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[scores.flatten().topk(mask_size(scores.numel(), fraction)).indices] = True
    return flat.view_as(scores)


def _forget_batches(
    tokenizer, forget: Any, batch_size: int, max_length: int, append_eos: bool, chat_template: bool
) -> list[dict[str, torch.Tensor]]:
    """The forget rows tokenized as the trainer does (answer-span labels) and padded into batches."""
    rows = as_rows(forget, "forget")
    tokenized: list[TokenizedRow] = tokenize_rows(
        tokenizer, rows, row_format(rows, "forget"), max_length=max_length, append_eos=append_eos,
        chat_template=chat_template,
    )
    collate = ForgetRetainCollator(pad_token_id(tokenizer))
    return [collate([{"forget": row} for row in chunk])["forget"] for chunk in batches(tokenized, batch_size)]


def _scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions whose next token is a labelled (answer) token, where the forget loss is taken."""
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return scored


def _activation_scores(
    model: nn.Module, modules: Mapping[str, nn.Module], data: Sequence[dict], device: torch.device, progress: bool
) -> dict[str, torch.Tensor]:
    """``|W_ij| * RMS_j``: RMS of input feature j over the scored forget positions (Wanda's score on the forget set)."""
    sums = {name: None for name in modules}
    count = 0
    for batch in tqdm(data, desc="activation scores", disable=not progress):
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
                  "use_cache": False}
        scored = _scored_positions(batch["labels"]).to(device)
        captured = capture_at_positions(model, modules, inputs, None, capture="input", stop_early=True)
        for name, value in captured.items():
            squares = value[scored].float().square().sum(0)
            sums[name] = squares if sums[name] is None else sums[name] + squares
        count += int(scored.sum())
    if count == 0:
        raise ValueError("the forget rows have no answer tokens to score (are they all truncated away?)")
    scores = {}
    for name, module in modules.items():
        rms = (sums[name] / count).sqrt()
        weight = module.weight.detach().float().abs()
        # nn.Linear stores [out, in]; Conv1D stores [in, out].
        scores[name] = weight * (rms[:, None] if isinstance(module, Conv1D) else rms[None, :])
    return scores


def _gradient_scores(
    model: nn.Module, modules: Mapping[str, nn.Module], data: Sequence[dict], device: torch.device, progress: bool
) -> dict[str, torch.Tensor]:
    """``|d NLL / d W|`` of the forget answers' summed NLL over the whole set (SalUn's saliency); taken with
    ``torch.autograd.grad``, so no ``.grad`` of the model is written."""
    weights = [module.weight for module in modules.values()]
    totals = [torch.zeros_like(weight, dtype=torch.float32) for weight in weights]
    for batch in tqdm(data, desc="gradient scores", disable=not progress):
        batch = {key: value.to(device) for key, value in batch.items()}
        with torch.enable_grad():
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
            loss = sequence_nll(*labelled_logits(model, inputs, batch["labels"]), average=False).sum()
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for total, grad in zip(totals, grads):
            if grad is not None:
                total += grad.float()
    return {name: total.abs() for name, total in zip(modules, totals)}


def _random_scores(modules: Mapping[str, nn.Module], seed: int) -> dict[str, torch.Tensor]:
    """Uniform scores from one generator seeded with ``seed``, drawn tensor by tensor in module order."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(module.weight.shape, generator=generator) for name, module in modules.items()}


def parameter_masks(
    model: nn.Module,
    tokenizer,
    forget: Any,
    rule: str,
    fraction: float = 0.1,
    seed: int = 0,
    batch_size: int = 16,
    *,
    max_length: int = 128,
    append_eos: bool = True,
    chat_template: bool = False,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Bool masks (by parameter name, same shapes) of the top ``fraction`` of every candidate weight under ``rule``.

    Candidates are the decoder blocks' linear weights that require grad (:func:`candidate_modules`). Rules:
    ``"activation"`` scores ``|W_ij| * RMS_j`` with RMS_j the root mean square of input feature j at the forget
    positions (Wanda-style); ``"gradient"`` scores ``|g_ij|``, the gradient of the forget answers' NLL accumulated
    over the set (SalUn-style); ``"random"`` draws uniform scores with ``seed``. Each tensor keeps the same number
    of elements under every rule, so comparisons of rules are at equal size. ``forget`` rows are (question,
    answer) pairs, TOFU-schema dicts or ``text`` rows, tokenized as ``UnlearningTrainer`` does (pass the same
    ``max_length``/``append_eos``/``chat_template``). The model's weights, gradients and training flag are left
    as they were.
    """
    if rule not in RULES:
        raise ValueError(f"unknown localization rule {rule!r}; choose one of {list(RULES)}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            # batch_size="2" failed with a bare TypeError, max_length=0 with a reshape error inside the model
            raise ValueError(f"{name} must be positive and an integer, got {value!r}")
    data = _forget_batches(tokenizer, forget, batch_size, max_length, append_eos, chat_template)
    modules = candidate_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no candidate weights: no nn.Linear/Conv1D weight inside its decoder layers "
            "requires grad (are the base weights frozen, e.g. under a PEFT adapter?)"
        )
    if rule != "random":
        # The gradient rule refused rows past the context (in labelled_logits); the activation rule read them: numbers
        # from positions a rotary model never saw, or an IndexError in learned position embeddings.
        longest = max(batch["input_ids"].shape[1] for batch in data)
        check_fits_context(model, longest, f"the forget rows (prompt and answer, up to max_length={max_length} tokens)")
    device = model_device(model)
    with evaluating(model):
        if rule == "activation":
            scores = _activation_scores(model, modules, data, device, progress)
        elif rule == "gradient":
            scores = _gradient_scores(model, modules, data, device, progress)
        else:
            scores = _random_scores(modules, seed)
    masks = {
        f"{name}.weight": _top_fraction(scores[name], fraction).to(module.weight.device)
        for name, module in modules.items()
    }
    selected = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    logger.info("%s masks: %d of %d elements in %d tensors", rule, selected, total, len(masks))
    return masks


def _zero_outside(grad: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(outside, 0)


# Set on the parameters a MaskedGradients hooks or freezes, while it is on.
_HELD_BY_MASKS = "_peft_unlearn_held_by_masks"


class MaskedGradients:
    """Gradient hooks that keep training inside the masks; ``remove()`` (or leaving a ``with`` block) undoes them.

    Masked parameters get a hook that zeroes their gradient outside the mask; every other trainable parameter is
    frozen for as long as the hooks are on (no gradient or optimizer state is spent on it), then unfrozen. With a
    zero gradient from the first step, Adam-type and SGD updates leave those elements exactly unchanged; decoupled
    weight decay does not, so train with ``weight_decay=0``.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        parameters = dict(model.named_parameters())
        held = [name for name, parameter in parameters.items() if getattr(parameter, _HELD_BY_MASKS, False)]
        if held:
            # A second set of hooks on top of the first trained only the elements both select, silently (and a
            # mask on a parameter the first froze failed with "does not require grad").
            raise ValueError(
                f"parameters of this model already train under parameter masks ({held[0]!r}, {len(held)} in all): "
                "an earlier restrict_to_masks or UnlearningTrainer(parameter_masks=...) is still on; call its "
                "remove() first (trainer.masked_gradients.remove())"
            )
        if not masks:
            raise ValueError("parameter_masks is empty: it would freeze every parameter and train nothing; give at "
                             "least one mask, or no parameter_masks to train the whole adapter")
        for name, mask in masks.items():
            if not isinstance(mask, torch.Tensor):
                raise ValueError(f"mask {name!r} must be a bool tensor, got {type(mask).__name__}")
            if name not in parameters:
                raise ValueError(f"mask {name!r} is not a parameter of {type(model).__name__}")
            parameter = parameters[name]
            if mask.dtype != torch.bool:
                raise ValueError(f"mask {name!r} must be a bool tensor, got {mask.dtype}")
            if mask.shape != parameter.shape:
                raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(parameter.shape)}")
            if not parameter.requires_grad:
                raise ValueError(f"mask {name!r} is on a parameter that does not require grad (it cannot train)")
        if not any(bool(mask.any()) for mask in masks.values()):
            raise ValueError("parameter_masks select no element (every mask is all False): training would change "
                             "nothing")
        self._frozen = [p for name, p in parameters.items() if p.requires_grad and name not in masks]
        for parameter in self._frozen:
            parameter.requires_grad_(False)
        self._handles = []
        for name, mask in masks.items():
            outside = ~mask.to(parameters[name].device)
            self._handles.append(parameters[name].register_hook(functools.partial(_zero_outside, outside=outside)))
        self._held = [parameters[name] for name in masks] + self._frozen
        for parameter in self._held:
            setattr(parameter, _HELD_BY_MASKS, True)
        trainable = sum(int(mask.sum()) for mask in masks.values())
        logger.info("training %d masked elements in %d tensors; froze %d other parameters",
                    trainable, len(masks), len(self._frozen))

    def remove(self) -> None:
        """Take the hooks off and unfreeze the parameters frozen for the masks."""
        for handle in self._handles:
            handle.remove()
        for parameter in self._frozen:
            parameter.requires_grad_(True)
        for parameter in self._held:
            setattr(parameter, _HELD_BY_MASKS, False)
        self._handles, self._frozen, self._held = [], [], []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def restrict_to_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> MaskedGradients:
    """Make training move only the ``True`` elements of ``masks`` (by parameter name): a removable handle, also a
    context manager. Raises ``ValueError`` for a name that is not a trainable parameter or a mismatched shape."""
    return MaskedGradients(model, masks)


def unrestricted_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """All-true masks over the candidate weights: the baseline that trains the same tensors without localizing."""
    return {f"{name}.weight": torch.ones_like(module.weight, dtype=torch.bool)
            for name, module in candidate_modules(model).items()}


def mask_overlap(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the elements selected by ``first`` that ``second`` selects too (chance level for random masks
    of equal size is their ``fraction``)."""
    for name, mask in first.items():
        if name not in second or second[name].shape != mask.shape:
            # a raw KeyError or a broadcasting error before
            raise ValueError(f"mask {name!r} has no mask of the same shape in the second set: compare masks of the "
                             "same model")
    shared = sum(int((mask & second[name]).sum()) for name, mask in first.items())
    return shared / max(1, sum(int(mask.sum()) for mask in first.values()))
