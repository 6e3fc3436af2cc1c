"""Ready-made unlearning runs: a gradient loss on a UIPE LoRA adapter, trained through ``UnlearningTrainer``,
then extrapolated by the alpha that forgets most within a utility floor. Used by the CLI and the demo."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PrinterCallback

from ..metrics import answer_accuracy
from ..tuners.uipe import UIPELoraConfig, extrapolate, select_alpha
from ..tuners.uipe.config import check_extrapolation_alpha
from ..tuners.uipe.selection import check_utility_floor
from .data import as_rows
from .trainer import UnlearningArguments, UnlearningTrainer

logger = logging.getLogger(__name__)

LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules")
# The recipe the tests validate on small models: LoRA r=8 on every linear layer, 8 forget + 8 retain rows per
# step, constant learning rate; per loss the knobs that keep it from collapsing the retain set.
LOSS_DEFAULTS: dict[str, dict[str, Any]] = {
    "ga": dict(max_steps=10),
    "grad_diff": dict(max_steps=64, retain_weight=10.0),
    "kl": dict(max_steps=32, retain_weight=10.0),
    "npo": dict(max_steps=32, retain_weight=3.0, beta=0.05),
    "simnpo": dict(max_steps=32, retain_weight=3.0, delta=3.0),
    "idk_dpo": dict(max_steps=24, retain_weight=3.0),
    "refusal": dict(max_steps=24, retain_weight=3.0),
}


def _pairs(rows: Sequence) -> list[tuple[str, str]] | None:
    """(question, answer) pairs of rows in the TOFU schema or given as tuples; None for raw-text rows."""
    pairs = []
    for row in rows:
        if isinstance(row, (tuple, list)) and len(row) == 2:
            pairs.append((str(row[0]), str(row[1])))
        elif isinstance(row, dict) and "question" in row and "answer" in row:
            pairs.append((str(row["question"]), str(row["answer"])))
        else:
            return None
    return pairs


def _check_base_model(model: nn.Module) -> None:
    """Refuse a model that already holds adapters: ``get_peft_model`` adds its adapter under the name ``default``,
    which replaced the weights and config of an adapter already named so (a LoRA fine-tune's), silently."""
    wrapped = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if isinstance(model, PeftModel) or wrapped:
        where = f" (in {wrapped[0]})" if wrapped else ""
        raise ValueError(
            f"unlearn_with_lora adds a new adapter to a base model, but this {type(model).__name__} already has "
            f"adapters{where}: merge them into the weights first (model = model.merge_and_unload()), or train the "
            "existing adapter with UnlearningTrainer"
        )


def _flags(model: nn.Module) -> tuple[list[tuple[nn.Parameter, bool]], list[tuple[nn.Module, bool]]]:
    """Every parameter's ``requires_grad`` and every module's training flag: ``get_peft_model`` freezes the base
    weights and training switches the model to train mode, and ``unload()`` undoes neither."""
    return [(p, p.requires_grad) for p in model.parameters()], [(m, m.training) for m in model.modules()]


def _restore_flags(flags: tuple[list[tuple[nn.Parameter, bool]], list[tuple[nn.Module, bool]]]) -> None:
    parameters, modules = flags
    for parameter, requires_grad in parameters:
        parameter.requires_grad_(requires_grad)
    for module, training in modules:
        module.training = training


def unlearn_with_lora(
    model: nn.Module,
    tokenizer,
    forget: Sequence,
    retain: Sequence | None = None,
    *,
    loss: str = "npo",
    uipe_alpha: float | str = "auto",
    utility_floor: float = 0.95,
    output_dir: str | None = None,
    progress: bool = True,
    **options: Any,
) -> tuple[PeftModel, dict[str, Any]]:
    """Unlearn ``forget`` with ``loss`` on a new UIPE LoRA adapter; returns ``(peft_model, summary)``.

    ``options`` may set LoRA fields (r, lora_alpha, lora_dropout, target_modules) and any ``UnlearningArguments``
    field; the rest comes from :data:`LOSS_DEFAULTS`. ``uipe_alpha="auto"`` selects alpha on the retain set with
    :func:`select_alpha` (needs question/answer rows); a number sets it directly. ``resume_from_checkpoint`` (a
    checkpoint folder, or True for the last one in ``output_dir``) continues an interrupted run with the same options.
    """
    if loss not in LOSS_DEFAULTS:
        raise ValueError(f"unknown unlearning loss {loss!r}; choose from {sorted(LOSS_DEFAULTS)}")
    _check_base_model(model)
    if uipe_alpha != "auto":
        uipe_alpha = check_extrapolation_alpha(uipe_alpha)  # before training, not after it
    check_utility_floor(utility_floor)
    lora = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
    lora.update({k: options.pop(k) for k in LORA_FIELDS if k in options})
    training = dict(per_device_train_batch_size=8, learning_rate=4e-3, lr_scheduler_type="constant", report_to=[],
                    save_strategy="no", logging_strategy="steps" if progress else "no", logging_steps=8, seed=0,
                    disable_tqdm=not progress,
                    use_cpu=not torch.cuda.is_available())
    defaults = dict(LOSS_DEFAULTS[loss])
    if "num_train_epochs" in options and "max_steps" not in options:
        defaults.pop("max_steps")  # the caller counts in epochs
    training.update(defaults)
    training.update(options)
    resume = training.get("resume_from_checkpoint")
    if resume is True and output_dir is None:
        raise ValueError("resume_from_checkpoint=True resumes from the last checkpoint in output_dir: give output_dir "
                         "(the folder of the interrupted run), or the checkpoint's folder itself")
    strategy = getattr(training["save_strategy"], "value", training["save_strategy"])
    if strategy != "no" and output_dir is None:
        # They went to a temporary folder removed when the run ended (or failed), so there was nothing to resume.
        raise ValueError(f"save_strategy={strategy!r} saves checkpoints, but without output_dir they would be written "
                         "to a temporary folder that is removed when the run ends: give output_dir")
    # Read once, type-checked: a generator was read by the accuracy below and reached the trainer empty.
    forget = as_rows(forget, "forget")
    retain = as_rows(retain, "retain") if retain else None
    forget_pairs, retain_pairs = _pairs(forget), _pairs(retain or [])
    chat = bool(training.get("chat_template", False))  # measured in the format the model is trained on
    before = {}
    if forget_pairs:
        before["forget_accuracy"] = answer_accuracy(model, tokenizer, forget_pairs, chat_template=chat)
    if retain_pairs:
        before["retain_accuracy"] = answer_accuracy(model, tokenizer, retain_pairs, chat_template=chat)

    with tempfile.TemporaryDirectory() as scratch:
        args = UnlearningArguments(output_dir=output_dir or scratch, unlearn_loss=loss, **training)
        torch.manual_seed(args.seed)
        flags = _flags(model)
        peft_model = get_peft_model(model, UIPELoraConfig(**lora))
        try:
            trainer = UnlearningTrainer(peft_model, args, forget_dataset=forget, retain_dataset=retain,
                                        processing_class=tokenizer)
            if not progress:
                # Without tqdm the Trainer prints every log dict, its final summary included.
                trainer.remove_callback(PrinterCallback)
            # TrainingArguments.resume_from_checkpoint is only read by training scripts: this recipe is one.
            trainer.train(resume_from_checkpoint=resume or None)
        except BaseException:
            peft_model.unload()  # a failed run leaves the caller's model as it was
            _restore_flags(flags)
            raise
    peft_model.eval()
    summary: dict[str, Any] = {"loss": loss, "steps": trainer.state.global_step,
                               **{f"before_{k}": v for k, v in before.items()}}
    if uipe_alpha == "auto":
        if forget_pairs and retain_pairs:
            selection = select_alpha(peft_model, tokenizer, forget_pairs, retain_pairs, utility_floor=utility_floor,
                                     progress=progress, chat_template=chat)
            summary["alpha"] = selection.alpha
            summary["alpha_table"] = [asdict(row) for row in selection.table]
        else:
            logger.warning("uipe_alpha='auto' needs question/answer forget and retain rows; keeping alpha = 0")
            summary["alpha"] = 0.0
    else:
        summary["alpha"] = uipe_alpha
        extrapolate(peft_model, uipe_alpha)
    if forget_pairs:
        summary["forget_accuracy"] = answer_accuracy(peft_model, tokenizer, forget_pairs, chat_template=chat)
    if retain_pairs:
        summary["retain_accuracy"] = answer_accuracy(peft_model, tokenizer, retain_pairs, chat_template=chat)
    return peft_model, summary


def npo_with_uipe(model: nn.Module, tokenizer, forget: Sequence[tuple[str, str]], retain: Sequence[tuple[str, str]],
                  progress: bool = True) -> PeftModel:
    """The demo's gradient method: NPO on a UIPE LoRA, alpha selected on the retain set."""
    peft_model, _ = unlearn_with_lora(model, tokenizer, forget, retain, loss="npo", progress=progress, max_steps=12)
    return peft_model
