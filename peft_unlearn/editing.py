"""The single entry point for editing: :func:`edit` dispatches to the active adapter's method."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .capture import context_length
from .metrics import answer_accuracy, evaluating
from .refusal_targets import self_improved_requests
from .requests import EditRequest, TokenizedBatch, as_edit_requests, chat_formatted, tokenize_prompts, tokenize_requests
from .tokenizer_record import check_recorded_tokenizer, record_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class EditResult:
    """What one :func:`edit` call did."""

    method: str
    adapter_name: str
    n_requests: int
    seconds: float
    edit_ids: list[int] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    # Per request: whether the edited model now gives every target token by teacher forcing (checked after the
    # call, outside ``seconds``); generation, which the metrics measure, can still differ.
    reached: list[bool] = field(default_factory=list)

    @property
    def edits_per_second(self) -> float:
        return self.n_requests / self.seconds if self.seconds > 0 else float("inf")

    @property
    def reliability(self) -> float:
        """Fraction of this call's requests whose target the edited model gives (teacher-forced)."""
        return sum(self.reached) / len(self.reached) if self.reached else float("nan")


class EditableTuner:
    """Mixin for the ``BaseTuner`` of every editing method of this library.

    A method implements :meth:`apply_edits`; :func:`edit` validates the inputs, times the call and fills the
    result's bookkeeping.
    """

    def apply_edits(
        self, tokenizer, requests: list[EditRequest], adapter_name: str, **options: Any
    ) -> dict[str, Any]:
        """Apply ``requests`` to adapter ``adapter_name``; return ``{"edit_ids": [...], **details}``."""
        raise NotImplementedError

    def remove_edits(self, edit_ids: Sequence[int], adapter_name: str) -> int:
        raise NotImplementedError(
            f"{type(self).__name__} cannot remove individual edits: its edits share weights. Keep the adapter saved "
            "before them and redo the edits to keep, or use GRACE (GraceConfig), whose edits are removed by id"
        )


# Neutral prompts used as unrelated inputs when the model cannot write its own.
BUILTIN_UNRELATED = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The first month of the year is",
    "A week has seven",
    "The sun rises in the",
    "Two plus two equals",
    "Bread is made from",
    "The largest ocean on Earth is the",
)


class adapters_disabled:
    """Run a model (a tuner, or a transformers model with adapters attached) on its base weights only: every
    tuner layer in it bypassed, restoring after. Which adapters are trainable does not change."""

    def __init__(self, model: nn.Module) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper  # modules_to_save, trainable tokens

        wrappers = (BaseTunerLayer, AuxiliaryTrainingWrapper)
        self.layers = [m for m in model.modules() if isinstance(m, wrappers)]

    def __enter__(self) -> None:
        self.states = [layer._disable_adapters for layer in self.layers]
        for layer in self.layers:
            layer._disable_adapters = True

    def __exit__(self, *exc) -> None:
        for layer, state in zip(self.layers, self.states):
            layer._disable_adapters = state


@contextlib.contextmanager
def peft_adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``model.disable_adapter()`` of a PeftModel (which also unmerges merged adapters and bypasses prompt-learning
    ones) without its side effect: re-enabling marks the active adapter trainable, so an adapter loaded for
    inference left with every weight requiring grad."""
    frozen = [parameter for parameter in model.parameters() if not parameter.requires_grad]
    try:
        with model.disable_adapter():
            yield model
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)


# Bounds of the default unrelated prompts: one sampled text per request between these counts, each as long as the
# longest edit prompt up to MAX_UNRELATED_TOKENS new tokens (thousands of keys, at a bounded cost for any call).
MIN_UNRELATED, MAX_UNRELATED, MAX_UNRELATED_TOKENS = 8, 64, 64
# Unrelated prompts per forward when a method reads them (a caller may give thousands).
UNRELATED_BATCH = 64


def own_unrelated_prompts(tuner: nn.Module, tokenizer, requests: Sequence[EditRequest], seed: int) -> list[str]:
    """Ordinary inputs for a method that must learn what *not* to change: the unedited model's own text, started
    from the first words of the edit prompts (one per request, between 8 and 64), or a built-in pool as a
    fallback."""
    from .metrics import sample_texts

    starters = sorted({r.prompt.split()[0] for r in requests})
    count = min(max(MIN_UNRELATED, len(requests)), MAX_UNRELATED)
    starters = [starters[i % len(starters)] for i in range(count)]
    longest = max(len(tokenizer(r.prompt)["input_ids"]) for r in requests)
    with adapters_disabled(tuner):
        texts = sample_texts(tuner.model, tokenizer, starters, max_new_tokens=min(longest, MAX_UNRELATED_TOKENS),
                             seed=seed)
    own = [text for text in texts if len(text.split()) > 1]
    return own or list(BUILTIN_UNRELATED)


def check_unrelated(unrelated: Sequence[str]) -> list[str]:
    """Caller-given unrelated prompts, without empty ones (at least one must remain)."""
    if isinstance(unrelated, str):
        raise TypeError("unrelated must be a list of prompts, not one string (it would be read character by "
                        "character)")
    kept = [u for u in unrelated if isinstance(u, str) and u.strip()]
    if not kept:
        raise ValueError("unrelated must contain at least one non-empty prompt")
    return kept


def unrelated_prompts(
    tuner: nn.Module, tokenizer, requests: Sequence[EditRequest], unrelated: Sequence[str] | None, seed: int
) -> list[str]:
    """The prompts an editing method must leave alone: the caller's ``unrelated`` (checked: non-empty, within the
    model's context), or by default the unedited model's own text (:func:`own_unrelated_prompts`, sampled with
    ``seed``)."""
    if unrelated is not None:
        kept = check_unrelated(unrelated)
        # Past the context, learned position embeddings (GPT-2) failed with a raw IndexError.
        check_rows_fit(tuner.model, tokenize_prompts(tokenizer, kept, padding_side="right"), "unrelated prompts")
        return kept
    return own_unrelated_prompts(tuner, tokenizer, requests, seed)


def the_active_adapter(model: nn.Module, what: str) -> str:
    """The one active adapter of a ``PeftModel``: with several active, every forward runs through all of them, so
    an edit fitted there would not hold in its adapter alone (and ``PeftModel.active_adapter`` may name any)."""
    active = list(model.base_model.active_adapters)
    if len(active) != 1:
        raise ValueError(f"{what} acts on one adapter, but {len(active)} are active ({active}); activate the one to "
                         "use with model.set_adapter(name)")
    return active[0]


def _editing_tuner(model: nn.Module, what: str) -> tuple[EditableTuner, str]:
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"{what} needs a PeftModel wrapping the model with one of this library's editing adapters "
            f"(e.g. peft.get_peft_model(model, AlphaEditConfig(...))); got {type(model).__name__}"
        )
    tuner = model.base_model
    adapter_name = the_active_adapter(model, what)
    if not isinstance(tuner, EditableTuner):
        peft_type = model.peft_config[adapter_name].peft_type
        raise TypeError(
            f"the active adapter {adapter_name!r} is of type {getattr(peft_type, 'value', peft_type)}, which "
            f"{what} does not handle; editing adapters are: {', '.join(editing_method_names())}"
        )
    return tuner, adapter_name


def editing_method_names() -> list[str]:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    return sorted(t.value.lower() for t, cls in PEFT_TYPE_TO_TUNER_MAPPING.items() if issubclass(cls, EditableTuner))


def check_tokenizer_matches(model: nn.Module, tokenizer) -> None:
    """Refuse a tokenizer whose ids the model's embedding cannot hold, or other than the one the model's active
    adapters were made with."""
    embeddings = model.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is None and isinstance(getattr(embeddings, "weight", None), torch.Tensor):
        vocab = embeddings.weight.shape[0]  # a LoRA or trainable-tokens layer wrapping the embedding
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"mismatched tokenizer: it has {len(tokenizer)} tokens but the model's embedding has {vocab} rows; "
            "load the tokenizer that belongs to this model"
        )
    check_recorded_tokenizer(model, tokenizer)


def check_requests(model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> None:
    """The checks every call's requests pass, on one tokenization: they fit the context, the tokenizer can write
    their targets, and no prompt gets two targets."""
    batch = tokenize_requests(tokenizer, requests)
    check_rows_fit(model, batch, "requests (prompt and target)")
    check_targets_representable(tokenizer, requests, batch)
    check_consistent_targets(requests, batch)


def check_rows_fit(model: nn.Module, batch: TokenizedBatch, what: str) -> None:
    """Refuse the rows of ``batch`` (``what``: requests, prompts) that exceed the model's context, naming them."""
    limit = context_length(model)
    if limit is None:
        return
    lengths = batch.attention_mask.sum(dim=1).tolist()
    too_long = [i for i, length in enumerate(lengths) if length > limit]
    if too_long:
        raise ValueError(
            f"{what} {too_long[:10]} are up to {max(lengths[i] for i in too_long)} tokens long, more than the "
            f"model's context of {limit} positions; shorten them"
        )


def check_targets_representable(tokenizer, requests: Sequence[EditRequest], batch: TokenizedBatch) -> None:
    """Refuse targets the tokenizer can only write as its unknown token (characters or words outside a vocabulary
    without byte fallback): the edit would teach the model to answer <unk>, which decodes to nothing, yet count as
    reached by teacher forcing."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    labels = batch.labels
    unknown = [i for i, request in enumerate(requests)
               if bool((labels[i] == unk).any()) and tokenizer.unk_token not in request.target]
    if unknown:
        raise ValueError(
            f"the targets of requests {unknown[:10]} (e.g. {requests[unknown[0]].target!r}) contain text this "
            f"tokenizer can only encode as its unknown token {tokenizer.unk_token!r}; the model could not write them "
            "back: rephrase them in characters and words of its vocabulary"
        )


def check_consistent_targets(requests: Sequence[EditRequest], batch: TokenizedBatch) -> None:
    """Refuse one call that asks for two different targets for the same prompt (a later call may re-edit it).
    Prompts and targets are compared as the model reads them, token by token: ``q`` and ``" " + q`` are one prompt
    to most tokenizers, and comparing strings let the later target silently win."""
    first: dict[tuple[int, ...], int] = {}
    targets: list[tuple[int, ...]] = []
    for index in range(len(requests)):
        ids, used, labels = batch.input_ids[index], batch.attention_mask[index].bool(), batch.labels[index]
        prompt = ids[used & (labels == -100)].tolist()
        targets.append(tuple(labels[labels != -100].tolist()))
        earlier = first.setdefault(tuple(prompt), index)
        if targets[earlier] != targets[index]:
            same = "the same prompt" if requests[earlier].prompt == requests[index].prompt else (
                f"prompts that tokenize the same ({requests[earlier].prompt!r}, {requests[index].prompt!r})")
            raise ValueError(
                f"requests {earlier} and {index} give {same} two targets ({requests[earlier].target!r}, "
                f"{requests[index].target!r}); keep one (a later call may edit the prompt again)"
            )


def check_not_merged(model: nn.Module, adapter_name: str) -> None:
    """Refuse to edit an adapter whose delta is merged into the base weights: the edit would change the unmerged
    factors only, and unmerging would then subtract a delta that was never added. Refuse too when another adapter
    is merged into a layer this one edits: a merged layer runs none of its unmerged adapters, so the edit could not
    be fitted there (a raw autograd error, or an edit without effect until unmerging). Refuse an adapter merged into
    any other layer as well: editing runs the original model (adapters disabled: AlphaEdit's context prompts, the
    unrelated prompts the model writes), and a disabled merged layer unmerges itself for good, so the edit left the
    other adapter unmerged and, being inactive, no longer applied."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if any(adapter_name in m.merged_adapters for _, m in layers):
        raise ValueError(
            f"adapter {adapter_name!r} is merged into the base weights; call model.unmerge_adapter() before "
            "editing (and merge again afterwards)"
        )
    for name, m in layers:
        if m.merged_adapters and adapter_name in m._get_available_adapters():
            raise ValueError(
                f"adapter {m.merged_adapters[0]!r} is merged into {name.removeprefix('base_model.model.')}, which "
                f"adapter {adapter_name!r} edits: a merged layer runs none of its unmerged adapters, so the edit "
                "could not be fitted there; call model.unmerge_adapter() before editing (and merge again afterwards)"
            )
    check_nothing_merged(model, "editing")


def check_nothing_merged(model: nn.Module, what: str) -> None:
    """Refuse when an adapter is merged into a layer: ``what`` runs the original model (adapters disabled), and a
    disabled merged layer unmerges itself and stays unmerged, a change the caller never asked for."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, m in model.named_modules():
        if isinstance(m, BaseTunerLayer) and m.merged_adapters:
            raise ValueError(
                f"adapter {m.merged_adapters[0]!r} is merged into {name.removeprefix('base_model.model.')}: {what} "
                "runs the original model with adapters disabled, which would unmerge it and leave it unmerged; call "
                f"model.unmerge_adapter() before {what} (and merge again afterwards)"
            )


def check_adapters_enabled(model: nn.Module) -> None:
    """Refuse to edit inside ``with model.disable_adapter():`` or after ``disable_adapter_layers()``: a method fits
    its edit through the adapter's own forward, which a disabled adapter bypasses."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) and m.disable_adapters for m in model.modules()):
        raise ValueError("the model's adapters are disabled (inside `with model.disable_adapter():`, or by "
                         "`disable_adapter_layers()`); edit outside that block, or call `enable_adapter_layers()` "
                         "first")


def check_edited_layers_resident(model: nn.Module, adapter_name: str) -> None:
    """Refuse to edit a layer whose weight accelerate keeps offloaded (on the meta device between forwards):
    editing reads that weight, and writes its adapter next to it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in module._get_available_adapters():
            weight = getattr(module.get_base_layer(), "weight", None)
            if isinstance(weight, torch.Tensor) and weight.device.type == "meta":
                raise ValueError(
                    f"{name} is offloaded (its weight is on the meta device, as accelerate's device_map leaves "
                    "offloaded layers): editing reads and writes that layer; load the model with it resident (its "
                    "device_map entry on 'cpu' or a GPU)"
                )


def edit(
    model: nn.Module,
    tokenizer,
    requests: Iterable[EditRequest | Mapping | Sequence],
    *,
    self_improve: bool = False,
    chat_template: bool = False,
    **options: Any,
) -> EditResult:
    """Apply edit requests to the active adapter of a ``PeftModel`` and return what was done.

    Calling it again adds further edits (sequential editing). ``self_improve=True`` first replaces every target
    with the model's own refusal of the prompt (see :mod:`peft_unlearn.refusal_targets`); the targets used are in
    ``EditResult.details["targets"]``. ``chat_template=True`` edits each prompt as a user turn of the tokenizer's
    chat template answered by the target (as the metrics' ``chat_template=True`` read it); everything the method
    tokenizes, unrelated prompts included, is formatted the same way. Method-specific options (``unrelated`` for
    GRACE and WISE; ``merge_queries``, ``batch_size``, ``target_batch_size`` and ``templates`` for AlphaEdit, MEMIT
    and ROME; ``progress`` for every method) are passed through to the method, which refuses options it does not
    take.
    With several adapters, the active one is edited (``model.set_adapter(name)`` first); ``adapter_name=`` is
    accepted only when it names the active adapter.
    """
    tuner, adapter_name = _editing_tuner(model, "peft_unlearn.edit")
    if "adapter_name" in options:
        # The methods take the adapter from here; passing it on failed with "got multiple values for argument".
        wanted = options.pop("adapter_name")
        if wanted != adapter_name:
            raise ValueError(
                f"peft_unlearn.edit edits the active adapter ({adapter_name!r}), not adapter_name={wanted!r}: call "
                f"model.set_adapter({wanted!r}) first"
            )
    if tokenizer is None or not callable(tokenizer):
        raise TypeError(f"peft_unlearn.edit needs the model's tokenizer, got {tokenizer!r}")
    for name, flag in (("self_improve", self_improve), ("chat_template", chat_template)):
        # A truthy string such as "no" or "False" turned self-improvement on: every target was replaced.
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    requests = as_edit_requests(requests)
    if not requests:
        raise ValueError("requests is empty: give at least one EditRequest")
    check_tokenizer_matches(model, tokenizer)
    check_not_merged(model, adapter_name)
    check_adapters_enabled(model)
    check_edited_layers_resident(model, adapter_name)
    config = model.peft_config[adapter_name]
    method = getattr(config, "solver", None) or config.peft_type.value.lower()  # MEMIT and ROME are AlphaEdit's
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    with evaluating(model), chat_formatted(chat_template):
        check_requests(model, tokenizer, requests)
        if self_improve:
            requests, own = self_improved_requests(model, tokenizer, requests, chat_template=chat_template)
            extra = {"targets": [r.target for r in requests], "self_improved": sum(own)}
            check_requests(model, tokenizer, requests)  # the model's own targets, checked as given ones are
        # Methods fit their edits by gradients, also when called under torch.no_grad() or inference_mode().
        with torch.inference_mode(False), torch.enable_grad():
            outcome = tuner.apply_edits(tokenizer, requests, adapter_name, **options)
    seconds = time.perf_counter() - start
    record_tokenizer(model, tokenizer, adapter_name)
    outcome = {**extra, **(outcome or {})}
    edit_ids = list(outcome.pop("edit_ids", []))
    logger.info("%s: applied %d edits in %.2fs", method, len(requests), seconds)
    reached = [score == 1.0 for score in answer_accuracy(
        model, tokenizer, [(r.prompt, r.target) for r in requests], chat_template=chat_template, per_example=True
    )]
    if not all(reached):
        # A method can finish without fitting every edit (too few steps, unrelated prompts the router cannot tell
        # from the edits, no room left in the null space): say so rather than leave it to the caller's metrics.
        logger.warning("%s: %d of %d edits do not give their targets yet (teacher-forced); EditResult.reached "
                       "marks them", method, len(reached) - sum(reached), len(reached))
    return EditResult(method, adapter_name, len(requests), seconds, edit_ids, outcome, reached)


def remove_edits(model: nn.Module, edit_ids: Sequence[int]) -> int:
    """Roll back edits by id (as listed in ``EditResult.edit_ids``); returns how many entries were removed."""
    tuner, adapter_name = _editing_tuner(model, "peft_unlearn.remove_edits")
    if isinstance(edit_ids, (str, bytes)) or not isinstance(edit_ids, Iterable):
        raise TypeError(f"edit_ids must be a list of integer edit ids (as in EditResult.edit_ids), got {edit_ids!r}")
    edit_ids = list(edit_ids)
    wrong = [i for i in edit_ids if isinstance(i, bool) or not isinstance(i, (int, torch.Tensor))
             or (isinstance(i, torch.Tensor) and (i.numel() != 1 or i.is_floating_point()))]
    if wrong:
        raise TypeError(f"edit ids must be integers, got {wrong[:10]}")
    edit_ids = [int(i) for i in edit_ids]
    if not edit_ids:
        raise ValueError("edit_ids is empty: nothing to remove")
    return tuner.remove_edits(edit_ids, adapter_name)
