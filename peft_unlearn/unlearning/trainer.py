"""Gradient-based unlearning as a ``transformers.Trainer``: GA, GradDiff, KL, NPO, SimNPO, IdkDPO and refusal
training on paired forget/retain batches, with the disabled adapter as the reference model."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import get_last_checkpoint

from ..capture import check_fits_context
from ..data.refusals import REFUSALS
from ..editing import adapters_disabled, check_tokenizer_matches, peft_adapter_disabled
from ..losses import labelled_logits, labelled_width
from ..metrics import evaluating
from ..requests import pad_token_id
from ..tokenizer_record import record_tokenizer
from ..tuners.options import check_integers, check_numbers
from .data import (
    ForgetRetainCollator,
    ForgetRetainDataset,
    as_rows,
    refusal_rows,
    row_format,
    tokenize_rows,
)
from .localization import restrict_to_masks
from .losses import (
    AccumulationWindow,
    LossCoefficients,
    SequenceNLL,
    UnlearningOutputs,
    get_unlearning_loss,
)

logger = logging.getLogger(__name__)


@dataclass
class UnlearningArguments(TrainingArguments):
    """``TrainingArguments`` plus the unlearning objective and its coefficients.

    ``beta`` defaults per loss (NPO 0.1, SimNPO 4.5, IdkDPO 0.1). ``remove_unused_columns`` is off: the trainer
    builds its own paired batches, which a model signature filter would strip.
    """

    unlearn_loss: str = field(
        default="npo",
        metadata={"help": "One of ga, grad_diff, kl, npo, simnpo, idk_dpo, refusal (see peft_unlearn.unlearning)."},
    )
    forget_weight: float = field(default=1.0, metadata={"help": "Weight of the forget term."})
    retain_weight: float = field(
        default=1.0, metadata={"help": "Weight of the retain term (NLL, or KL for 'kl'); 0 skips the retain set."}
    )
    beta: float | None = field(
        default=None, metadata={"help": "Inverse temperature of npo/simnpo/idk_dpo; default per loss."}
    )
    delta: float = field(default=0.0, metadata={"help": "SimNPO reward margin."})
    max_length: int = field(
        default=128,
        metadata={"help": "Longest tokenized example: the answer is cut to fit (the prompt only if alone longer)."},
    )
    append_eos: bool = field(default=True, metadata={"help": "End every answer with the eos token."})
    chat_template: bool = field(default=False, metadata={"help": "Format questions with the chat template."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the trainer builds its own batches."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("append_eos", "chat_template"):
            # A truthy string such as "no" appended the eos token (or used the template) it meant to leave out.
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        # Given as strings or bools they failed in a comparison that named no option, or trained (beta=True as 1).
        check_numbers(self, ["forget_weight", "retain_weight", "delta"] + ([] if self.beta is None else ["beta"]))
        check_integers(self, ["max_length"])
        loss = get_unlearning_loss(self.unlearn_loss)
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False: UnlearningTrainer builds its own paired batches")
        if self.beta is None:
            self.beta = loss.default_beta
        if loss.default_beta is not None and not 0 < self.beta < math.inf:
            raise ValueError(f"beta must be a positive finite number for {self.unlearn_loss!r}, got {self.beta}")
        if not 0 < self.forget_weight < math.inf:
            raise ValueError(f"forget_weight must be a positive finite number, got {self.forget_weight}")
        if not 0 <= self.retain_weight < math.inf:
            raise ValueError(f"retain_weight must be a finite number >= 0, got {self.retain_weight}")
        if not math.isfinite(self.delta):
            raise ValueError(f"delta must be a finite number, got {self.delta}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (one prompt and one answer token), got {self.max_length}")

    @property
    def coefficients(self) -> LossCoefficients:
        return LossCoefficients(self.forget_weight, self.retain_weight, self.beta, self.delta)


class RetainPairingCallback(TrainerCallback):
    """Tell the paired dataset the epoch on every process, so retain rows advance across epochs (accelerate only
    forwards ``set_epoch`` to the dataset in some sampler layouts)."""

    def __init__(self, dataset: ForgetRetainDataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))


def check_transformers_can_save_adapter(model: nn.Module, args: TrainingArguments) -> None:
    """Refuse, before training, an adapter attached with transformers' ``load_adapter`` that transformers cannot
    save: its PEFT integration (``get_adapter_state_dict``, ``active_adapters``) needs a newer peft than the one
    installed, so the Trainer's checkpoint failed only after all the training steps had run."""
    if isinstance(model, PeftModel) or not getattr(model, "_hf_peft_config_loaded", False):
        return
    strategy = getattr(args.save_strategy, "value", args.save_strategy)
    if strategy == "no":
        return
    try:
        from transformers.integrations import peft as transformers_peft

        minimum = getattr(transformers_peft, "MIN_PEFT_VERSION", None)
        if minimum is not None:
            transformers_peft.check_peft_version(min_version=minimum)
    except ValueError:
        import peft

        raise ValueError(
            f"this transformers saves adapters attached with model.load_adapter only with peft>={minimum} (found "
            f"peft {peft.__version__}), so the Trainer's checkpoints would fail after training: load the adapter with "
            "peft.PeftModel.from_pretrained(model, adapter, is_trainable=True) instead, or set save_strategy='no' "
            "and save it yourself"
        ) from None


class UnlearningTrainer(Trainer):
    """Unlearn ``forget_dataset`` while keeping ``retain_dataset``, with ``args.unlearn_loss``.

    Rows are question/answer pairs in the TOFU schema (the loss is taken on the answer tokens) or raw ``text``.
    NPO, KL and IdkDPO compare against a reference: for a ``PeftModel`` it is the same model with its adapter
    disabled, so no second copy of the weights exists; a model without adapter is deep-copied once (logged).
    ``reference_model`` replaces either with an explicit model (e.g. another checkpoint); an adapter that trains the
    base model's biases in place (PEFT's ``bias='all'``/``'lora_only'``) needs one, as disabling it keeps them.
    ``parameter_masks`` (bool tensors by parameter name, e.g. from :func:`~.localization.parameter_masks`) restricts
    training to the masked elements: other parameters are frozen and gradients outside the masks are zeroed until
    ``trainer.masked_gradients.remove()``.
    """

    # compute_loss divides by the whole optimizer step's sizes: the Trainer must not divide by the steps again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module,
        args: UnlearningArguments,
        forget_dataset: Any,
        retain_dataset: Any = None,
        processing_class: Any = None,
        refusals: Sequence[str] = REFUSALS,
        reference_model: nn.Module | None = None,
        parameter_masks: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, UnlearningArguments):
            raise TypeError(f"args must be UnlearningArguments, got {type(args).__name__}")
        optimizer = (kwargs.get("optimizers") or (None, None))[0]
        groups = getattr(optimizer, "param_groups", [])
        decays = [args.weight_decay] + [group.get("weight_decay", 0) for group in groups]
        if parameter_masks is not None and max(decays) > 0:
            raise ValueError(
                f"parameter_masks need weight_decay=0 (got {max(decays)}, in the arguments or the optimizer given): "
                "decoupled weight decay would move the weights outside the masks"
            )
        for name in ("train_dataset", "eval_dataset", "data_collator", "compute_loss_func"):
            if kwargs.get(name) is not None:
                raise TypeError(
                    f"UnlearningTrainer builds its training batches from forget_dataset/retain_dataset and its loss "
                    f"from args.unlearn_loss; do not pass {name} (measure forgetting with peft_unlearn.metrics, e.g. "
                    "in a callback)"
                )
        if args.eval_strategy != "no":
            raise ValueError(
                "UnlearningTrainer has no evaluation loop: set eval_strategy='no' and measure forgetting with "
                "peft_unlearn.metrics or peft_unlearn.evaluate_unlearning (e.g. in a callback)"
            )
        if getattr(args.save_strategy, "value", args.save_strategy) == "best":
            # The Trainer saves a "best" checkpoint only on evaluation metrics: it trained and saved nothing.
            raise ValueError(
                "save_strategy='best' (and load_best_model_at_end with it) picks checkpoints by evaluation metrics, "
                "which UnlearningTrainer never computes (no evaluation loop), so no checkpoint would be saved: use "
                "save_strategy='steps' or 'epoch' and compare the checkpoints with peft_unlearn.metrics"
            )
        if args.label_smoothing_factor:
            raise ValueError("label_smoothing_factor is not used by the unlearning losses; leave it at 0")
        if args.train_sampling_strategy not in ("random", "sequential"):
            raise ValueError(
                f"train_sampling_strategy={args.train_sampling_strategy!r} groups rows by length, which the paired "
                "forget/retain items do not have; use 'random' or 'sequential'"
            )
        if reference_model is not None and _shares_parameters(reference_model, model):
            raise ValueError(
                "reference_model shares weights with the model being trained (get_peft_model wraps the base model in "
                "place, so the base model is the trained model): omit reference_model and the model with its "
                "adapter disabled is the reference"
            )
        if not any(parameter.requires_grad for parameter in model.parameters()):
            raise ValueError(
                "nothing in the model is trainable: an adapter loaded with PeftModel.from_pretrained or transformers' "
                "load_adapter is frozen unless loaded with is_trainable=True"
            )
        half = next((name for name, parameter in model.named_parameters()
                     if parameter.requires_grad and parameter.dtype == torch.float16), None)
        if half is not None:
            # Adam's state lives in the parameters' dtype: squared gradients under 6e-8 and its epsilon round to 0 in
            # float16, and the steps went to inf or wrecked the model (retained answers 1.0 -> 0.67 in 8 steps).
            raise ValueError(
                f"{half} is trainable in float16, where the optimizer's state underflows and training wrecks the "
                "model: load the model in float32 or bfloat16 (fp16=True trains float32 weights in mixed "
                "precision), or train a PEFT adapter kept in float32 (get_peft_model's autocast_adapter_dtype)"
            )
        if processing_class is None:
            raise ValueError("UnlearningTrainer needs the tokenizer as processing_class to tokenize the datasets")
        check_transformers_can_save_adapter(model, args)
        tokenizer = processing_class
        check_tokenizer_matches(model, tokenizer)
        if hasattr(reference_model, "get_input_embeddings"):  # a plain nn.Module reference has no embedding to check
            try:
                check_tokenizer_matches(reference_model, tokenizer)
            except ValueError as error:
                raise ValueError(f"reference_model: {error}") from None
        self.unlearning_loss = get_unlearning_loss(args.unlearn_loss)
        self.with_retain = self.unlearning_loss.reads_retain_set(args.retain_weight)
        reads_reference = bool(self.unlearning_loss.reference_parts(self.with_retain))
        if args.neftune_noise_alpha and reads_reference:
            raise ValueError(
                f"neftune_noise_alpha adds noise to the embeddings of the trained pass only (the reference pass runs "
                f"in eval mode), so {args.unlearn_loss} would compare a noisy model with a clean reference: leave it "
                "unset, or use a loss that reads no reference"
            )
        if reads_reference and reference_model is None:
            trains_biases = _adapters_training_base_biases(model)
            if trains_biases:
                name, bias = trains_biases[0]
                raise ValueError(
                    f"{args.unlearn_loss} compares against a reference, which is the model with its adapter disabled, "
                    f"but adapter {name!r} has bias={bias!r}: PEFT trains the base model's biases in place, and "
                    "disabling the adapter does not restore them, so the reference would drift with training. Use "
                    "bias='none', or pass reference_model= (a copy of the model before unlearning)"
                )
            trained_base = _trained_base_parameters(model)
            if trained_base:
                raise ValueError(
                    f"{args.unlearn_loss} compares against a reference, which is the model with its adapter disabled, "
                    f"but base-model parameters outside the adapter are trainable ({trained_base[0]!r}, "
                    f"{len(trained_base)} in all): they are trained in place, and disabling the adapter does not "
                    "restore them, so the reference would drift with training. Freeze them (requires_grad_(False)), "
                    "train them as part of the adapter (modules_to_save), or pass reference_model= (a copy of the "
                    "model before unlearning)"
                )
        dataset = self._paired_dataset(tokenizer, args, forget_dataset, retain_dataset, refusals)
        longest = max(len(row.input_ids) for rows in dataset.parts() for row in rows)
        check_fits_context(model, longest, f"the longest tokenized row (max_length={args.max_length})")
        batch = args.train_batch_size * args.world_size
        if args.dataloader_drop_last and len(dataset) < batch:
            # The Trainer then trains no step: with max_steps it warns about an IterableDataset, with epochs it
            # asks for max_steps.
            raise ValueError(
                f"dataloader_drop_last=True drops every batch: the forget set has {len(dataset)} rows, fewer than "
                f"one batch of {batch}, so no step would train; set dataloader_drop_last=False or a smaller "
                "per_device_train_batch_size"
            )
        collator = ForgetRetainCollator(pad_token_id(tokenizer))

        super().__init__(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=collator,
            processing_class=processing_class,
            **kwargs,
        )
        self.add_callback(RetainPairingCallback(dataset))
        record_tokenizer(model, tokenizer)
        self._logged_terms: dict[str, list[float]] = {}
        self._logged_steps = 0.0  # optimizer steps the logged terms span (see compute_loss)

        # An adapter attached through transformers' PEFT integration (model.load_adapter) is disabled layer by layer.
        uses_adapter = isinstance(self.model, PeftModel) or bool(getattr(self.model, "_hf_peft_config_loaded", False))
        if reads_reference and reference_model is None and uses_adapter:
            trained = [name for name, parameter in self.model.named_parameters()
                       if parameter.requires_grad and "lora_B" in name and bool(parameter.detach().any())]
            if trained:
                logger.warning(
                    "%s's reference is the model with its adapter disabled, and the adapter being trained already "
                    "changes the model (%s is not zero): the reference is the base model without those changes. "
                    "Where the adapter's current state should be the reference (an adapter fine-tuned before "
                    "unlearning), pass reference_model=", args.unlearn_loss, trained[0],
                )
        if reads_reference and reference_model is None and not uses_adapter:
            logger.warning(
                "%s needs a reference model and %s has no PEFT adapter: deep-copying the model as the reference "
                "(twice the weight memory; wrap the model with a PEFT adapter to use the disabled adapter instead)",
                args.unlearn_loss, type(self.model).__name__,
            )
            reference_model = copy.deepcopy(self.model)
        self.reference_model = None
        if reference_model is not None:
            self.reference_model = reference_model.to(self.args.device).eval().requires_grad_(False)
        if isinstance(self.model, PeftModel) and args.activation_checkpointing:
            base = self.model.get_base_model()
            if not getattr(base, "_require_grads_hooks", None):
                # Checkpointed blocks only backpropagate into adapters if their inputs require grad.
                self.model.enable_input_require_grads()
        # After the reference copy (which must keep every weight) and the move to the device (the masks follow it).
        self.masked_gradients = None
        if parameter_masks is not None:
            self.masked_gradients = restrict_to_masks(self.model, parameter_masks)

    def _paired_dataset(self, tokenizer, args, forget_dataset, retain_dataset, refusals) -> ForgetRetainDataset:
        """Tokenize and pair the sets, checking them against what the loss reads."""
        loss, with_retain = self.unlearning_loss, self.with_retain
        options = dict(max_length=args.max_length, append_eos=args.append_eos, chat_template=args.chat_template)
        forget_rows = as_rows(forget_dataset, "forget_dataset")
        forget_kind = row_format(forget_rows, "forget_dataset")
        forget = tokenize_rows(tokenizer, forget_rows, forget_kind, **options)
        forget_refusal = None
        if loss.uses_refusals:
            if forget_kind != "qa":
                raise ValueError(
                    f"{args.unlearn_loss!r} answers the forget questions with refusals: forget_dataset needs "
                    "'question' and 'answer' columns, not raw 'text'"
                )
            if isinstance(refusals, str):
                raise TypeError("refusals must be a list of refusal texts, not one string (it would be read "
                                "character by character)")
            if not isinstance(refusals, Iterable):
                raise TypeError(f"refusals must be a list of refusal texts, got {type(refusals).__name__}")
            refusals = list(refusals)  # a generator was read up by the checks below and then was empty
            if not refusals:
                raise ValueError("refusals is empty: give at least one refusal text")
            blank = [i for i, text in enumerate(refusals) if not isinstance(text, str) or not text.strip()]
            if blank:
                raise ValueError(f"refusals {blank[:10]} are empty or not strings: every refusal must be a text")
            forget_refusal = refusal_rows(tokenizer, forget_rows, refusals, **options)
        retain = None
        if with_retain:
            if retain_dataset is None:
                raise ValueError(
                    f"{args.unlearn_loss!r} has a retain term: pass retain_dataset (or set retain_weight=0)"
                )
            retain_rows = as_rows(retain_dataset, "retain_dataset")
            retain = tokenize_rows(tokenizer, retain_rows, row_format(retain_rows, "retain_dataset"), **options)
        elif retain_dataset is not None:
            logger.info("%s with retain_weight=%s does not use retain_dataset", args.unlearn_loss, args.retain_weight)
        logger.info(
            "unlearning with %s: %d forget rows, %s retain rows",
            args.unlearn_loss, len(forget), len(retain) if retain is not None else "no",
        )
        return ForgetRetainDataset(forget, retain, forget_refusal)

    # --- forward passes -------------------------------------------------------------------------------------------

    @staticmethod
    def _run_parts(
        model: nn.Module, inputs: dict, parts: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One forward pass over the concatenated parts (the collator pads them to one width); per part, the logits
        over the labelled spans and the labels aligned with them (see :func:`~peft_unlearn.losses.labelled_logits`)."""
        concatenated = {
            key: torch.cat([inputs[part][key] for part in parts]) for key in ("input_ids", "attention_mask", "labels")
        }
        labels = concatenated.pop("labels")
        # One width for every part of the batch, so that the model's and the reference's columns line up where both
        # passes keep chosen positions (each pass still carries its own labels: a model that cannot returns all).
        width = max(labelled_width(part_inputs["labels"]) for part_inputs in inputs.values())
        logits, labels = labelled_logits(model, {**concatenated, "use_cache": False}, labels, width)
        sizes = [inputs[part]["input_ids"].shape[0] for part in parts]
        return dict(zip(parts, logits.split(sizes))), dict(zip(parts, labels.split(sizes)))

    @contextlib.contextmanager
    def reference(self, model: nn.Module) -> Iterator[nn.Module]:
        """The reference model in eval mode: the disabled adapter, or the deep copy of a model without adapter.

        ``model`` may be wrapped (DDP, DeepSpeed); the forward goes through the wrapper so sharded setups gather
        their weights, while the adapter is switched off on the unwrapped PEFT model, which shares its layers.
        """
        if self.reference_model is not None:
            # accelerate autocasts only the prepared model's forward (bf16/fp16); the reference is never prepared, so
            # without this it ran in float32 and NPO/KL/DPO compared two precisions (a log-ratio != 0 at step 0).
            with self.accelerator.autocast():
                yield self.reference_model
            return
        unwrapped = self.accelerator.unwrap_model(model)
        if not isinstance(unwrapped, PeftModel):
            with evaluating(model), adapters_disabled(unwrapped):
                yield model
            return
        with evaluating(model), peft_adapter_disabled(unwrapped):
            yield model

    def train(self, *args: Any, **kwargs: Any):
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if resume:
            self._refuse_finished_checkpoint(resume)
        self._logged_terms, self._logged_steps = {}, 0.0  # an earlier run's unlogged last steps do not leak in
        return super().train(*args, **kwargs)

    def _refuse_finished_checkpoint(self, resume: str | bool) -> None:
        """A checkpoint that already reached ``max_steps`` is refused: where ``max_steps`` ends inside an epoch, the
        Trainer resumes into that epoch and takes one more step before it checks the count (4 steps came back 5)."""
        if resume is True:
            output_dir = self.args.output_dir
            folder = get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
        else:
            folder = str(resume)
        state_file = os.path.join(folder, "trainer_state.json") if folder else None
        if self.args.max_steps <= 0 or state_file is None or not os.path.isfile(state_file):
            return  # the Trainer's own errors name a missing checkpoint
        done = TrainerState.load_from_json(state_file).global_step
        if done >= self.args.max_steps:
            raise ValueError(f"checkpoint {folder} has already taken {done} steps, max_steps is {self.args.max_steps}: "
                             "there is nothing left to resume (where max_steps ends inside an epoch the Trainer "
                             "takes one more step); load the adapter from the checkpoint, or raise max_steps to train "
                             "on")

    def evaluate(self, *args: Any, **kwargs: Any):
        raise NotImplementedError(
            "UnlearningTrainer has no evaluation loop: measure forgetting with peft_unlearn.metrics or "
            "peft_unlearn.evaluate_unlearning"
        )

    def predict(self, *args: Any, **kwargs: Any):
        raise NotImplementedError(
            "UnlearningTrainer has no prediction loop: generate with the model, or score with peft_unlearn.metrics"
        )

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Tokens seen, summed over the batch's parts (the Trainer's counter looks for top-level input ids)."""
        for part in inputs.values():
            super()._track_num_input_tokens(part)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's estimate, summed over the parts the loss trains on."""
        parts = self.unlearning_loss.parts(self.with_retain)
        return sum(super(UnlearningTrainer, self).floating_point_ops(inputs[part]) for part in parts if part in inputs)

    def get_batch_samples(self, *args: Any, **kwargs: Any) -> tuple[list, AccumulationWindow]:
        """The micro-batches of one optimizer step and their sizes, which compute_loss divides by: summed over the
        processes of a distributed run when ``average_tokens_across_devices`` (the Trainer's default), so the update
        does not depend on how the step's rows are spread over processes either."""
        batch_samples, _ = super().get_batch_samples(*args, **kwargs)
        window = AccumulationWindow.of(batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            window = window.across_processes(self.accelerator)
        return batch_samples, window

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: AccumulationWindow | torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, UnlearningOutputs]:
        """The objective on one micro-batch. In training its sums are divided by the sizes of the whole optimizer
        step (``num_items_in_batch``, from :meth:`get_batch_samples`), so the micro-batches' losses add up to the
        step's mean whatever the accumulation; called alone, the batch is its own window."""
        window = num_items_in_batch if isinstance(num_items_in_batch, AccumulationWindow) else None
        loss = self.unlearning_loss
        reference_logits, reference_labels, reference_nlls = {}, {}, {}
        reference_parts = loss.reference_parts(self.with_retain)
        if reference_parts:
            # Before the model's pass, so the reference activations are gone before the autograd graph is built; on
            # the parts no term reads its logits on, only per-example NLLs outlive the reference's pass.
            read_logits = loss.reference_logit_parts(self.with_retain)
            with torch.no_grad(), self.reference(model) as reference:
                all_logits, all_labels = self._run_parts(reference, inputs, reference_parts)
            for part in reference_parts:
                if part in read_logits:
                    reference_logits[part], reference_labels[part] = all_logits[part], all_labels[part]
                else:
                    reference_nlls[part] = SequenceNLL.of(all_logits[part], all_labels[part])
            del all_logits, all_labels
        logits, labels = self._run_parts(model, inputs, loss.parts(self.with_retain))
        outputs = UnlearningOutputs(logits=logits, labels=labels, reference_logits=reference_logits,
                                    reference_labels=reference_labels, window=window, reference_nlls=reference_nlls)
        terms = loss(outputs, self.args.coefficients, self.with_retain)
        # A micro-batch's part of the step's mean; with the window summed over processes, the gradient average over
        # processes divides by their number, which this multiplies back.
        share = (window.micro_batches, window.processes) if window is not None else (1, 1)
        if model.training and self.args.logging_strategy != "no":
            # Summed, the micro-batches' shares give each step's term; the log divides by the steps (each micro-batch
            # is 1/micro_batches of one), as the Trainer's loss does: an epoch's last step may have fewer micro-batches.
            for name, value in terms.items():
                if name != "loss":
                    self._logged_terms.setdefault(name, []).append(value.item() * share[1])
            self._logged_steps += 1 / share[0]
        total = terms["loss"] * share[1]
        return (total, outputs) if return_outputs else total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the forget/retain terms since the last training log, averaged over its optimizer steps like the loss
        (this process's batches)."""
        if "loss" in logs and self._logged_terms:
            for name, values in self._logged_terms.items():
                logs[name] = sum(values) / self._logged_steps
            self._logged_terms, self._logged_steps = {}, 0.0
        super().log(logs, start_time)


def _adapters_training_base_biases(model: nn.Module) -> list[tuple[str, str]]:
    """(adapter name, bias option) of the PEFT adapters whose ``bias`` option ('all', 'lora_only', ...) made bias
    parameters of the base model trainable: those are trained in place, so disabling the adapter keeps the trained
    values. The adapter's own parameters (``lora_bias``, modules_to_save copies) carry its name and are left out."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return []
    adapters = [(name, config.bias) for name, config in configs.items()
                if getattr(config, "bias", "none") not in (None, "none")]
    if not adapters:
        return []
    names = [f".{name}." for name in configs]
    trained = [name for name, parameter in model.named_parameters()
               if parameter.requires_grad and name.endswith("bias") and not any(part in name for part in names)]
    return adapters if trained else []


def _trained_base_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters of a model with PEFT adapters that belong to no adapter (an adapter's own
    parameters carry its name: ``lora_A.default.weight``, ``trainable_tokens_delta.default``): a base weight unfrozen
    by hand (an ``lm_head`` trained along with a LoRA) is trained in place, which disabling the adapter keeps."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return []
    return [name for name, parameter in model.named_parameters()
            if parameter.requires_grad and not any(f".{adapter}." in name or name.endswith(f".{adapter}")
                                                   for adapter in configs)]


def _shares_parameters(first: nn.Module, second: nn.Module) -> bool:
    """Whether two modules hold any parameter tensor in common."""
    held = {id(parameter) for parameter in second.parameters()}
    return any(id(parameter) in held for parameter in first.parameters())
