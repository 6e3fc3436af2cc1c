"""Per-layer UIPE: the extrapolation factor lives in the scaling of PEFT's own LoRA layers.

A UIPE adapter uses the stock LoRA layers (Linear, Embedding, Conv, ...); only the factor ``1 + alpha`` on
each layer's scaling is added, through LoRA's ``set_scale`` so that ``r``, ``lora_alpha``, rank/alpha patterns and
rsLoRA keep their meaning. Everything that reads the scaling (forward, merge) then sees the extrapolated update.
DoRA is refused by the config: its weight is not linear in the scaling.
"""

from __future__ import annotations

from collections.abc import Iterator

from peft.tuners.lora import LoraLayer
from torch import nn


def lora_layers(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, LoraLayer]]:
    """(module name, layer) of every LoRA layer that holds ``adapter_name``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.scaling:
            yield name, module


def set_layer_extrapolation(layer: LoraLayer, adapter_name: str, alpha: float) -> None:
    """Apply ``(1 + alpha)`` times the trained update of ``adapter_name`` in this layer (the adapter must not be
    merged: merged weights hold the old factor)."""
    layer.set_scale(adapter_name, 1.0 + alpha)


def update_b_parameter_names(layer: LoraLayer, adapter_name: str) -> list[str]:
    """Names (relative to the layer) of the parameters the LoRA update is linear in: ``lora_B`` weight and bias,
    or ``lora_embedding_B`` for embeddings. Scaling them by ``1 + alpha`` folds the extrapolation into the weights."""
    names = []
    if adapter_name in layer.lora_B:
        names += [f"lora_B.{adapter_name}.{name}" for name, _ in layer.lora_B[adapter_name].named_parameters()]
    if adapter_name in layer.lora_embedding_B:
        names.append(f"lora_embedding_B.{adapter_name}")
    return names
