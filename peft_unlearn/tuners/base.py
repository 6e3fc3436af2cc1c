"""PEFT plumbing shared by this library's editing tuners: their adapters are written by ``peft_unlearn.edit``, never
trained by an outer optimiser, and they target modules by exact name."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
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
    """Exact-name targeting (names are resolved before anything is replaced) and nothing trainable outside edits."""

    target_module_mapping: dict[str, list[str]] = {}

    @staticmethod
    def _check_target_module_exists(peft_config, key: str) -> bool:
        return key in peft_config.target_modules

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for parameter in model.parameters():
            parameter.requires_grad = False

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PeftModel's forward and generate enter this; without it their ``adapter_names`` (a per-row choice of
        adapter, which LoRA supports) would be dropped silently and every row would use the active adapter."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "adapter_names (a different adapter per row) is not supported by editing adapters; run one batch "
                "per adapter with model.set_adapter(name), and `with model.disable_adapter():` for the base model"
            )
        yield


class EditLayer(BaseTunerLayer):
    """A tuner layer whose adapter tensors are written by editing, never by an optimiser: activating an adapter
    (PEFT's ``set_adapter`` marks the active adapter's tensors trainable) leaves them frozen."""

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=True)


class BatchAwareLayer:
    """A tuner layer whose decisions concern whole sequences. Before every forward its tuner hands it the batch's
    attention mask (padding never counts); its number of rows, from which :meth:`token_grid` recovers [B, T, d]
    where the model flattened the batch (OPT runs its MLP on [B*T, d]); and whether the call continues the
    previous call's sequences (a decoding step on a filled key/value cache) or starts new ones."""

    _attention_mask: torch.Tensor | None = None
    _batch_rows: int | None = None
    _continues_sequences: bool = False
    # Attributes holding, per adapter, a [rows, ...] routing state carried across decoding steps.
    _row_states: tuple[str, ...] = ()

    def token_grid(self, hidden: torch.Tensor) -> torch.Tensor:
        return token_grid(hidden, self._batch_rows)

    def reorder_rows(self, index: torch.Tensor) -> None:
        """Follow the cache when beam search reorders its rows: row i's state becomes row ``index[i]``'s."""
        for name in self._row_states:
            states = getattr(self, name)
            for adapter, state in list(states.items()):
                if state is not None and state.shape[0] == index.shape[0]:
                    states[adapter] = state[index.to(state.device)]


def cached_length(cache: Any) -> int:
    """Tokens already held by a transformers key/value ``Cache``; 0 without one."""
    return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0


def _share_batch_layout(module: nn.Module, args, kwargs) -> None:
    inputs = dict(kwargs)
    if args and isinstance(args[0], torch.Tensor):
        inputs.setdefault("input_ids", args[0])
    mask, rows = inputs.get("attention_mask"), batch_rows(inputs)
    # Recent transformers pass the cache as `cache`, earlier 5.x releases as `past_key_values`.
    cache = inputs.get("cache", inputs.get("past_key_values"))
    continues = cached_length(cache) > 0
    layers = [layer for layer in module.modules() if isinstance(layer, BatchAwareLayer)]
    for layer in layers:
        layer._attention_mask, layer._batch_rows, layer._continues_sequences = mask, rows, continues
    _follow_reorders(cache, layers)


def _follow_reorders(cache: Any, layers: list[BatchAwareLayer]) -> None:
    """Beam search reorders the cache's rows between decoding steps (``reorder_cache``); the layers' routing state
    must move with them, or a row would keep one beam's keys and values and another beam's routing. The cache
    becomes an instance of a subclass that also reorders the layers (held by weak reference: no cycle keeps the
    cache alive, and a copy of the cache reorders itself)."""
    if not hasattr(cache, "reorder_cache"):
        return
    cache._routing_layers = [weakref.ref(layer) for layer in layers]
    if not isinstance(cache, _ReordersRouting):
        base = type(cache)
        if base not in _ROUTING_CACHES:
            _ROUTING_CACHES[base] = type(base.__name__, (_ReordersRouting, base), {"__module__": base.__module__})
        cache.__class__ = _ROUTING_CACHES[base]


class _ReordersRouting:
    """Mixed into a key/value cache class: ``reorder_cache`` also reorders the routing state of the layers."""

    def reorder_cache(self, beam_idx: torch.Tensor, *args: Any, **kwargs: Any):
        result = super().reorder_cache(beam_idx, *args, **kwargs)
        for reference in getattr(self, "_routing_layers", ()):
            layer = reference()
            if layer is not None:
                layer.reorder_rows(beam_idx)
        return result


_ROUTING_CACHES: dict[type, type] = {}


class SingleLayerTuner(EditingTuner):
    """A method that wraps one MLP output projection, chosen by ``layer`` (default: ``default_depth`` of the way
    up the decoder) or by an explicit module name. Subclasses set ``tuner_layer_cls`` and ``linear_cls``."""

    linear_cls: type
    default_depth: float

    def __init__(self, model, peft_config, adapter_name, **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        if not getattr(self.model, "_batch_layout_hook", False):
            self.model.register_forward_pre_hook(_share_batch_layout, with_kwargs=True)
            self.model._batch_layout_hook = True

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        if peft_config.target_modules:
            self.model.get_submodule(peft_config.target_modules[0])  # a clear AttributeError for a wrong name
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
