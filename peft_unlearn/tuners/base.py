"""PEFT plumbing shared by this library's editing tuners: their adapters are written by ``peft_unlearn.edit``, never
trained by an outer optimiser, and they target modules by exact name."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from torch import nn

from ..capture import (
    FrozenLayers,
    batch_rows,
    containing_decoder_layer,
    mlp_output_projection_name,
    num_decoder_layers,
    token_grid,
)
from ..editing import EditableTuner


class EditingTuner(BaseTuner, EditableTuner):
    """Exact-name targeting (names are resolved before anything is replaced), nothing trainable outside edits, and
    loads that take a saved adapter whole or not at all."""

    target_module_mapping: dict[str, list[str]] = {}
    # Config fields that set the adapter's tensor shapes (named when saved shapes disagree with them).
    recorded_sizes: tuple[str, ...] = ()
    # Tensors an earlier version of this library saved and this one ignores on load.
    retired_tensors: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, **kwargs: Any) -> None:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            # Checked before BaseTuner's setup, which adds the new config to the wrapped model's own peft_config
            # (save_pretrained then wrote it as an adapter) before resolving module names against the wrong root.
            raise ValueError(
                f"{type(self).__name__} wraps a transformers model, but this is a PeftModel (adapters "
                f"{list(model.peft_config)}): add the adapter to it with model.add_adapter(name, config) instead. "
                "PEFT keeps adapters of one method per PeftModel, and combines methods only in PeftMixedModel, which "
                "does not take this library's"
            )
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        stamps = self.__dict__.setdefault("_created_stamps", {})
        if created_by_a_load():
            stamps[adapter_name] = tensor_stamp(model, adapter_name)
        else:  # the caller's own adapter (get_peft_model, add_adapter): a refused load into it never removes it
            stamps.pop(adapter_name, None)

    def created_by_this_load(self, adapter_name: str) -> bool:
        """Whether ``adapter_name`` was added by a load (PEFT adds the adapter before it reads the saved tensors) and
        nothing was written into it since: the load now reading its tensors created it."""
        created = self.__dict__.get("_created_stamps", {}).get(adapter_name)
        return created is not None and created == tensor_stamp(self.model, adapter_name)

    def resized_by_this_load(self, adapter_name: str) -> None:
        """The load that created ``adapter_name`` replaced its tensors to fit the saved ones: it is still that load's
        own adapter (a refusal after this removes it)."""
        self.__dict__.setdefault("_created_stamps", {})[adapter_name] = tensor_stamp(self.model, adapter_name)

    def discard_if_unwritten(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` if the refused load created it: it would otherwise be left behind empty (and, as
        the only adapter, the base model's modules wrapped). An adapter that existed before the load, even one never
        edited, stays as it was."""
        if not self.created_by_this_load(adapter_name):
            return
        if list(self.peft_config) == [adapter_name]:
            self.unload()
        else:
            self.delete_adapter(adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name: str, state_dict: dict) -> dict:
        """PEFT calls this with the saved tensors before copying any of them: a saved adapter that does not fit
        (tensors missing, another method's, other shapes, NaN) is refused here, with the model as it was."""
        saved = {key: tensor for key, tensor in state_dict.items()
                 if tensor_name(key) not in cls.retired_tensors}
        tuner = getattr(model, "base_model", None)
        existing = isinstance(tuner, EditingTuner) and not tuner.created_by_this_load(adapter_name)
        try:
            check_saved_adapter(cls, model, config, adapter_name, saved, into_existing=existing)
        except ValueError:
            if isinstance(tuner, EditingTuner):
                tuner.discard_if_unwritten(adapter_name)
            raise
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, saved)

    @classmethod
    def check_saved_layout(cls, saved: dict[str, torch.Tensor]) -> None:
        """Refuse saved tensors in a layout of an earlier version that cannot be loaded (none by default)."""

    @staticmethod
    def _check_target_module_exists(peft_config, key: str) -> bool:
        return key in peft_config.target_modules

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for parameter in model.parameters():
            parameter.requires_grad = False

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """PEFT's weighted combination of LoRA adapters does not apply to edits (PEFT would otherwise pass the call
        on to the transformers model, which has no such method)."""
        raise ValueError(
            f"add_weighted_adapter combines LoRA adapters; {type(self).__name__} adapters hold edits: apply both "
            "sets of edits to one adapter with peft_unlearn.edit instead"
        )

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PeftModel's forward and generate enter this; without it their ``adapter_names`` (a per-row choice of
        adapter, which LoRA supports) would be dropped silently and every row would use the active adapter."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "adapter_names (a different adapter per row) is not supported by editing adapters; run one batch "
                "per adapter with model.set_adapter(name), and `with model.disable_adapter():` for the base model"
            )
        drafting = speculative_decoding(kwargs, getattr(self.model, "generation_config", None))
        if drafting and routes_sequences(self.model):
            raise ValueError(
                f"{drafting} verifies several drafted tokens per forward and rolls back the rejected ones, which "
                "this adapter's routing (a decision per sequence, carried across decoding steps) cannot follow; "
                "generate without it"
            )
        if kwargs.get("cache_implementation") == "paged" and routes_sequences(self.model):
            # Refused here: continuous batching runs its forwards in a thread that logs their errors and returns
            # failed requests rather than raising.
            raise ValueError(PACKED_SEQUENCES_REFUSAL)
        yield

    def generate_batch(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' continuous batching, refused where the routing decides per sequence: its forwards run in a
        thread that only logs their refusal (see :data:`PACKED_SEQUENCES_REFUSAL`)."""
        if routes_sequences(self.model):
            raise ValueError(PACKED_SEQUENCES_REFUSAL)
        return self.model.generate_batch(*args, **kwargs)


def routes_sequences(model: nn.Module) -> bool:
    """Whether an enabled layer of ``model`` decides per sequence (see :class:`BatchAwareLayer`)."""
    return any(isinstance(m, BatchAwareLayer) and not m.disable_adapters and m.routes_sequences()
               for m in model.modules())


PACKED_SEQUENCES_REFUSAL = (
    "continuous batching (generate_batch, or generate with cache_implementation='paged') packs several sequences "
    "into one row, as do padding-free batches (position_ids restarting within a row, from DataCollatorWithFlattening); "
    "this adapter's routing (a decision per sequence, carried across decoding steps) cannot tell them apart: an "
    "edited prompt would route the sequences packed with it; generate with model.generate and a dynamic or static "
    "cache, and batch with padding and an attention mask"
)


def target_module(model: nn.Module, name: str) -> nn.Module:
    """The module ``target_modules`` names. Editing tuners match full dotted names only (one module each), so a
    blank, short or wrong name is refused (an AttributeError, as torch's lookup raises) with the modules it could
    mean."""
    if not isinstance(name, str) or not name.strip():
        raise AttributeError(f"target_modules must hold full dotted module names, got {name!r}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        ending = [found for found, _ in model.named_modules() if found.endswith(f".{name}")]
        hint = (f"modules ending in it: {', '.join(ending[:4])}{', ...' if len(ending) > 4 else ''} "
                f"({len(ending)}); name one" if ending else
                "none ends in it either; give a full name from model.named_modules(), or a layer index")
        raise AttributeError(
            f"{type(model).__name__} has no module {name!r}: target_modules takes full dotted module names; "
            + hint
        ) from None


PEFT_PREFIX = "base_model.model."


def tensor_name(key: str) -> str:
    """The tensor's own name in a state-dict key: 'grace_keys' in '....mlp.c_proj.grace_keys'."""
    return key.rsplit(".", 1)[-1]


def tensor_stamp(model: nn.Module, adapter_name: str) -> tuple:
    """Identity and version of every tensor the tuner layers hold for ``adapter_name``: editing replaces them and a
    load copies into them, so an equal stamp means nothing was written since."""
    return tuple(
        (name, store[adapter_name].data_ptr(), store[adapter_name]._version)
        for layer in model.modules() if isinstance(layer, BaseTunerLayer)
        for name, store in adapter_stores(layer, adapter_name)
    )


def adapter_stores(layer: BaseTunerLayer, adapter_name: str) -> Iterator[tuple[str, nn.ParameterDict | BufferDict]]:
    """(name, store) of every per-adapter parameter or buffer store of ``layer`` that holds ``adapter_name``."""
    for name in layer.adapter_layer_names + layer.other_param_names:
        store = getattr(layer, name, None)
        if isinstance(store, (nn.ParameterDict, BufferDict)) and adapter_name in store:
            yield name, store


def created_by_a_load() -> bool:
    """Whether PEFT is adding an adapter to read saved tensors into (``PeftModel.from_pretrained``, or
    ``load_adapter`` under a new name) rather than for the caller (``get_peft_model``, ``add_adapter``): the tuner
    is handed the same call either way, so the caller is found on the stack."""
    from peft import PeftModel

    loads = {PeftModel.load_adapter.__code__, PeftModel.from_pretrained.__func__.__code__}
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in loads:
            return True
        frame = frame.f_back
    return False


def check_saved_adapter(tuner_cls: type[EditingTuner], model: nn.Module, config, adapter_name: str,
                        saved: dict[str, torch.Tensor], into_existing: bool = False) -> None:
    """Raise ``ValueError`` unless ``saved`` (a checkpoint's tensors) holds exactly the tensors this adapter saves,
    with its shapes and finite values: PEFT alone loads a subset silently (the rest stays zero), ignores another
    method's tensors, and names a shape conflict only in a raw state-dict error. ``into_existing``: the load writes
    into an adapter that existed before it (``load_adapter`` under a taken name), which keeps its own config."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    method = config.peft_type.value.lower()
    expected = {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in
                get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False).items()}
    saved = {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in saved.items()}
    unexpected = sorted(saved.keys() - expected.keys())
    if unexpected:
        others = sorted({str(peft_type.value).lower() for peft_type, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items()
                         for key in unexpected if tensor_name(key).startswith(prefix)} - {method})
        if others:
            raise ValueError(
                f"the saved adapter holds {' and '.join(others)} tensors ({unexpected[0]}, ...), not {method} ones: "
                f"it was saved with {others[0]}; load it without a config of another method (and with "
                "adapter_config.json's peft_type as saved)"
            )
        raise ValueError(
            f"the saved adapter holds tensors a {method} adapter with this config has no place for: "
            f"{unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}; the config disagrees with the saved weights"
        )
    missing = sorted(expected.keys() - saved.keys())
    if missing:
        raise ValueError(
            f"the saved {method} adapter lacks {len(missing)} of its {len(expected)} tensors: {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}; its weights file is incomplete: save the adapter again"
        )
    tuner_cls.check_saved_layout(saved)
    for key, tensor in saved.items():
        wanted = tuple(expected[key].shape)
        if tuple(tensor.shape) != wanted:
            raise ValueError(
                f"saved tensor {key} has shape {tuple(tensor.shape)} but this {method} adapter expects {wanted}: "
                + shape_conflict_cause(tuner_cls, model, config, key, tuple(tensor.shape), wanted,
                                       adapter_name if into_existing else None)
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"saved tensor {key} holds NaN or infinite values: the adapter file is corrupted; "
                             "refusing to load it")


def shape_conflict_cause(tuner_cls: type[EditingTuner], model: nn.Module, config, key: str,
                         saved: tuple[int, ...], wanted: tuple[int, ...], existing: str | None = None) -> str:
    """The likely cause of a saved shape that differs from the adapter's: a base layer of another width (the
    differing sizes are this layer's input or output width), sizes in the config that the file disagrees with, or,
    loading into the ``existing`` adapter of that name, that adapter's own sizes (a load keeps its config)."""
    module_name = key.rsplit(".", 1)[0]
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer = root.get_submodule(module_name)
    widths = {layer.in_features, layer.out_features}
    if len(saved) == len(wanted) and all(w in widths for s, w in zip(saved, wanted) if s != w):
        return (f"the base model's {module_name} takes {layer.in_features} inputs to {layer.out_features} outputs, "
                "so the adapter was saved on a base model of another width; load it on the model it was made for")
    sizes = ", ".join(f"{name}={getattr(config, name)}" for name in tuner_cls.recorded_sizes)
    if existing is not None:
        return (f"the model already has an adapter {existing!r}, and loading into it keeps its config ({sizes}), "
                "which holds other edits than the saved adapter; load it under a new adapter_name (or call "
                f"delete_adapter({existing!r}) first)")
    return (f"the sizes recorded in the adapter's config ({sizes}) disagree with the saved tensors; the config was "
            "edited or belongs to another save of the adapter")


def speculative_decoding(generate_kwargs: dict, model_config: Any) -> str | None:
    """The speculative decoding a ``generate`` call asks for (an assistant model, prompt lookup or early exit), from
    its arguments, its generation config or the model's; None if none."""
    configs = [generate_kwargs, getattr(generate_kwargs.get("generation_config"), "__dict__", {}),
               getattr(model_config, "__dict__", {})]
    for option in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
        if any(config.get(option) is not None for config in configs):
            return option
    return None


def _moving_only(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (what ``Module.to``, ``half()``, ``cuda()`` apply to each tensor) with its device move kept and any
    change of dtype left out."""

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        converted = fn(tensor)
        return converted if converted.dtype == tensor.dtype else tensor.to(converted.device)

    return convert


class EditParameterDict(nn.ParameterDict):
    """An editing layer's per-adapter parameters: ``model.to(torch.bfloat16)`` (``half()``, ...) moves them but keeps
    their dtype. Editing writes float32 and later edits build on what is stored: rounded to bf16, AlphaEdit's second
    moments were no longer positive semi-definite and the next edit's solve wrecked the model."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        return super()._apply(_moving_only(fn), recurse)


class EditBufferDict(BufferDict):
    """An editing layer's per-adapter buffers, kept in their dtype as :class:`EditParameterDict` keeps parameters."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        return super()._apply(_moving_only(fn), recurse)


class EditLayer(BaseTunerLayer):
    """A tuner layer whose adapter tensors are written by editing, never by an optimiser: activating an adapter
    (PEFT's ``set_adapter`` marks the active adapter's tensors trainable) leaves them frozen, and following the
    base layer to its device, or a cast of the whole model, keeps their dtype (editing writes float32): layers hold
    them in :class:`EditParameterDict` and :class:`EditBufferDict`."""

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=True)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """PEFT's version also casts to the base layer's dtype and re-wraps parameters as trainable: loading with
        ``low_cpu_mem_usage=True`` into a bf16 model rounded codebooks, memories and factors to bf16."""
        base_device, _ = self._get_base_layer_device_and_dtype(self.get_base_layer())
        target = device if device is not None else base_device
        if target is None:
            return
        for _, store in adapter_stores(self, adapter_name):
            item = store[adapter_name]
            if item.device.type == "meta" or item.device == torch.device(target):
                continue
            moved = item.detach().to(target)
            store[adapter_name] = nn.Parameter(moved, requires_grad=False) if isinstance(item, nn.Parameter) else moved


class BatchAwareLayer:
    """A tuner layer whose decisions concern whole sequences. Before every forward its tuner hands it the batch's
    attention mask (padding never counts); its number of rows, from which :meth:`token_grid` recovers [B, T, d]
    where the model flattened the batch (OPT runs its MLP on [B*T, d]); whether the call continues sequences held
    by a filled key/value cache; and where those sequences' routing state lives: on the cache itself, so the state
    follows that cache (its copies, beam reorders, row selections and crops, and any later call that continues it)
    and another call in between cannot touch it."""

    _attention_mask: torch.Tensor | None = None
    _batch_rows: int | None = None
    _continues_sequences: bool = False
    _cached_length: int = 0
    _sequence_states: dict | None = None

    def token_grid(self, hidden: torch.Tensor) -> torch.Tensor:
        return token_grid(hidden, self._batch_rows)

    def valid_tokens(self, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
        """[batch, length] validity of this forward's tokens from the batch's attention mask (padding is invalid);
        None when the forward has no mask of these rows (every token counts)."""
        mask = self._attention_mask
        if mask is None or mask.shape[0] != batch:
            return None
        return mask[:, -length:].to(device).bool()

    def routes_sequences(self) -> bool:
        """Whether the active adapters decide per sequence (so a forward of several new tokens routes them as one)."""
        return True

    def routing_version(self, adapter: str) -> tuple:
        """What the routing state depends on besides the tokens (an edit changes it): state kept under another
        version is not continued."""
        return ()

    def _state_key(self, adapter: str) -> tuple:
        if "_state_id" not in self.__dict__:
            self._state_id = next(_STATE_IDS)
        return self._state_id, adapter, self.routing_version(adapter)

    def continued_state(self, adapter: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The routing state ``adapter`` left for the sequences this forward continues (of ``shape``)."""
        history = (self._sequence_states or {}).get(self._state_key(adapter), [])
        state = next((state for end, state in reversed(history) if end == self._cached_length), None)
        if state is None or tuple(state.shape) != tuple(shape):
            raise ValueError(
                f"this forward continues a key/value cache without the routing state of adapter {adapter!r} for its "
                f"{self._cached_length} tokens: the cache was filled with another adapter, with the adapter disabled "
                "or changed by an edit since, or cropped; run the whole sequence again (without past_key_values) "
                "or fill the cache with this adapter as it is now"
            )
        return state

    def keep_state(self, adapter: str, state: torch.Tensor, length: int) -> None:
        """Leave ``state`` [rows, ...] for a forward that continues these sequences (now ``length`` tokens longer);
        :meth:`latest_state` reads it back."""
        if self._sequence_states is not None:
            self._sequence_states.setdefault(self._state_key(adapter), []).append((self._cached_length + length, state))
        self.__dict__.setdefault("_latest_states", {})[adapter] = state

    def latest_state(self, adapter: str) -> torch.Tensor | None:
        """The routing state the most recent forward left (e.g. WISE's per-memory scores), for inspection."""
        return self.__dict__.get("_latest_states", {}).get(adapter)

    def forget_states(self, adapter: str) -> None:
        self.__dict__.get("_latest_states", {}).pop(adapter, None)


_STATE_IDS = itertools.count()


def cached_length(cache: Any) -> int:
    """Tokens already held by a transformers key/value ``Cache``; 0 without one."""
    return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0


def _share_batch_layout(module: nn.Module, args, kwargs) -> tuple | None:
    inputs = dict(kwargs)
    if args and isinstance(args[0], torch.Tensor):
        inputs.setdefault("input_ids", args[0])
    # Recent transformers pass the cache as `cache`, earlier 5.x releases as `past_key_values`.
    cache = inputs.get("cache", inputs.get("past_key_values"))
    if packs_sequences(inputs, cache) and routes_sequences(module):
        raise ValueError(PACKED_SEQUENCES_REFUSAL)
    mask, rows = token_validity(inputs.get("attention_mask")), batch_rows(inputs)
    past = cached_length(cache)
    states = _routing_states(cache)
    for layer in module.modules():
        if isinstance(layer, BatchAwareLayer):
            layer._attention_mask, layer._batch_rows = mask, rows
            layer._continues_sequences, layer._cached_length, layer._sequence_states = past > 0, past, states
    return _whole_sequences_through_shared_layers(module, args, kwargs, inputs)


def _whole_sequences_through_shared_layers(module: nn.Module, args, kwargs: dict, inputs: dict) -> tuple | None:
    """Gemma 4 passes only the ``logits_to_keep`` last tokens of a prompt through its key/value-sharing top layers
    (as generate asks): a layer there that routes per sequence saw the prompt's last token alone, decided otherwise
    than on the whole prompt, and left its state for a cache one token long (the next decoding step was refused).
    The same positions given as a tensor keep the logits as narrow and every token in those layers."""
    keep = kwargs.get("logits_to_keep")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep <= 0:
        return None
    tokens = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2 or tokens.shape[1] <= keep:
        return None
    if not routes_sequences(module) or not any(getattr(m, "is_kv_shared_layer", False) for m in module.modules()):
        return None
    length = tokens.shape[1]
    return args, {**kwargs, "logits_to_keep": torch.arange(length - keep, length, device=tokens.device)}


def packs_sequences(inputs: dict, cache: Any) -> bool:
    """Whether a forward holds several sequences in one row: continuous batching passes their boundaries
    (``cu_seq_lens_q``); padding-free training (``DataCollatorWithFlattening``) passes only position ids that restart
    at each sequence, with no attention mask and no cache, which is how transformers itself recognises packing."""
    if inputs.get("cu_seq_lens_q") is not None:
        return True
    positions = inputs.get("position_ids")
    if positions is None or inputs.get("attention_mask") is not None or cached_length(cache) > 0:
        return False
    return bool((positions.diff(dim=-1) != 1).any())


def token_validity(mask: torch.Tensor | dict[str, torch.Tensor | None] | None) -> torch.Tensor | None:
    """The attention mask as [B, T] validity: a 2-D mask as it is; a 4-D one (static and sliding-window caches pass
    [B, 1, queries, keys], boolean or additive) marks the current tokens that attend to anything. Under a static
    cache, generate passes models whose config lists ``layer_types`` (Qwen2, Qwen3, Gemma, ...) one 4-D mask per
    layer type: padding attends to nothing in any of them, so the full-attention one (else any) is read."""
    if isinstance(mask, dict):
        mask = next((m for m in (mask.get("full_attention"), *mask.values()) if m is not None), None)
    if mask is None or mask.dim() != 4:
        return mask
    attends = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    return attends.any(dim=-1)


def _routing_states(cache: Any) -> dict:
    """Where this forward's layers keep their routing state: on a transformers key/value cache, per (layer,
    adapter) the state after each forward that filled it, as [(cached length after it, state)] (the cache's class
    becomes a subclass that carries the state through its row operations, crops and resets; a copy of the cache
    copies it); without a cache, a store that lives for this forward only."""
    if not hasattr(cache, "reorder_cache"):
        return {}
    if not isinstance(cache, _CarriesRouting):
        base = type(cache)
        if base not in _ROUTING_CACHES:
            _ROUTING_CACHES[base] = type(base.__name__, (_CarriesRouting, base), {"__module__": base.__module__})
        cache.__class__ = _ROUTING_CACHES[base]
    return cache.__dict__.setdefault("_routing_states", {})


class _CarriesRouting:
    """Mixed into a key/value cache class: the routing state of its sequences follows its rows and its length."""

    def _map_routing_rows(self, rows) -> None:
        for history in self.__dict__.get("_routing_states", {}).values():
            history[:] = [(end, rows(state)) for end, state in history]

    def reorder_cache(self, beam_idx: torch.Tensor, *args: Any, **kwargs: Any):
        result = super().reorder_cache(beam_idx, *args, **kwargs)
        self._map_routing_rows(lambda state: state[beam_idx.to(state.device)])
        return result

    def batch_select_indices(self, indices: torch.Tensor):
        result = super().batch_select_indices(indices)
        self._map_routing_rows(lambda state: state[indices.to(state.device)])
        return result

    def batch_repeat_interleave(self, repeats: int):
        result = super().batch_repeat_interleave(repeats)
        self._map_routing_rows(lambda state: state.repeat_interleave(repeats, dim=0))
        return result

    def crop(self, *args: Any, **kwargs: Any):
        result = super().crop(*args, **kwargs)
        length = cached_length(self)
        for history in self.__dict__.get("_routing_states", {}).values():
            history[:] = [(end, state) for end, state in history if end <= length]
        return result

    def reset(self, *args: Any, **kwargs: Any):
        """Emptied for its next sequences (a static cache is reused so): the earlier ones' states would otherwise
        pile up, and one of a refilled length continued a refill without this adapter instead of refusing it."""
        result = super().reset(*args, **kwargs)
        self.__dict__.get("_routing_states", {}).clear()
        return result


_ROUTING_CACHES: dict[type, type] = {}


class SingleLayerTuner(EditingTuner):
    """A method that wraps one MLP output projection, chosen by ``layer`` (default: ``default_depth`` of the way
    up the decoder) or by an explicit module name. Subclasses set ``tuner_layer_cls`` and ``linear_cls``."""

    linear_cls: type
    default_depth: float
    # Whether the method may wrap the output embedding (the vocabulary projection), whose output the narrowed
    # logits of training hold at labelled positions only.
    wraps_output_embedding: bool = True

    def __init__(self, model, peft_config, adapter_name, **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        if getattr(self.model, "_batch_layout_hook", None) is None:
            self.model._batch_layout_hook = self.model.register_forward_pre_hook(_share_batch_layout, with_kwargs=True)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        """PEFT's unloading, which also removes the batch-layout hook once no layer reads it: the returned model kept
        it, walking its modules and changing the class of its key/value caches on every forward."""
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        if not any(isinstance(module, BatchAwareLayer) for module in model.modules()):
            handle = model.__dict__.pop("_batch_layout_hook", None)
            if handle is not None:
                handle.remove()
        return model

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        if peft_config.target_modules:
            module = target_module(self.model, peft_config.target_modules[0])
            output_embedding = getattr(self.model, "get_output_embeddings", lambda: None)()
            if not self.wraps_output_embedding and module is output_embedding:
                raise ValueError(
                    f"{peft_config.peft_type.value} cannot wrap the output embedding "
                    f"{peft_config.target_modules[0]!r}: its values are trained at every position of a sequence, "
                    "and training computes the vocabulary projection at the answer's positions only; name a decoder "
                    "layer's module"
                )
            if peft_config.layer is not None:  # a saved config holds both; they must name the same module
                named = mlp_output_projection_name(self.model, peft_config.layer)
                if named != peft_config.target_modules[0]:
                    raise ValueError(
                        f"layer={peft_config.layer} names {named!r} but target_modules names "
                        f"{peft_config.target_modules[0]!r}; give one of them"
                    )
        else:
            layer = peft_config.layer
            if layer is None:
                n_layers = num_decoder_layers(self.model)
                layer = min(n_layers - 1, int(self.default_depth * n_layers))
            peft_config.target_modules = [mlp_output_projection_name(self.model, layer)]
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config)
            return
        self._replace_module(parent, target_name, self.linear_cls(target, adapter_name, peft_config), target)

    def wrapped_layer(self, adapter_name: str) -> tuple[str, nn.Module]:
        """(module name, layer) of the module this adapter wraps."""
        for name, module in self.model.named_modules():
            if isinstance(module, self.tuner_layer_cls) and adapter_name in module._get_available_adapters():
                return name, module
        raise ValueError(f"adapter {adapter_name!r} wraps no {self.tuner_layer_cls.__name__}")

    def frozen_below(self, adapter_name: str, inputs) -> FrozenLayers:
        """The decoder layers below the one this adapter wraps, computed once for ``inputs``: training that changes
        only the wrapped module's output replays them at every step."""
        index = containing_decoder_layer(self.model, self.wrapped_layer(adapter_name)[0])
        return FrozenLayers(self.model, index or 0, inputs)
