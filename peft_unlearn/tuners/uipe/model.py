"""The UIPE LoRA tuner, extrapolation of a trained adapter, and export to a plain LoRA adapter."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from safetensors.torch import save_file
from torch import nn

from ...capture import mixture_of_experts_blocks
from ...outputs import staged_output
from .config import UIPELoraConfig, check_extrapolation_alpha, check_no_full_copies
from .layer import lora_layers, set_layer_extrapolation, update_b_parameter_names

logger = logging.getLogger(__name__)

LORA_PREFIX = LoraModel.prefix


class UIPELoraModel(LoraModel):
    """LoRA whose update is applied ``1 + extrapolation_alpha`` times (UIPE, arXiv 2503.04693).

    PEFT requires a prefix of its own per method, so this tuner registers ``uipe_lora_`` while its layers keep
    LoRA's parameter names (``lora_A``/``lora_B``): checkpoints are plain LoRA tensors plus a config with the factor.
    PEFT 0.21 selects adapter weights structurally (by tuner layer), so saving, loading and merging do not depend on
    the prefix; the one place that parses parameter names by prefix, injection from a state dict, is translated
    below.
    """

    prefix: str = "uipe_lora_"

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        check_no_full_copies(config)  # a task model may have added its head since the config was checked
        if isinstance(config.target_modules, str) and config.target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            config.target_modules = all_linear_projections(model, config)
        if state_dict is not None:
            # BaseTuner finds the targeted modules by splitting keys at "." + prefix; the keys carry LoRA's names.
            marker = "." + LORA_PREFIX
            state_dict = {
                (key.rsplit(marker, 1)[0] + "." + self.prefix if marker in key else key): value
                for key, value in state_dict.items()
            }
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        alpha = self.peft_config[adapter_name].extrapolation_alpha
        for _, layer in lora_layers(model, adapter_name):
            set_layer_extrapolation(layer, adapter_name, alpha)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, *args, **kwargs):
        """PEFT's weighted combination. It builds the new adapter from the sources' scaled updates, which already
        carry their ``1 + alpha``; the new adapter holds the combined update as it is (its factor is 1)."""
        super().add_weighted_adapter(adapters, weights, adapter_name, *args, **kwargs)
        self.peft_config[adapter_name].extrapolation_alpha = 0.0
        for _, layer in lora_layers(self.model, adapter_name):
            set_layer_extrapolation(layer, adapter_name, 0.0)


def all_linear_projections(model: nn.Module, config: LoraConfig) -> set[str]:
    """PEFT's ``"all-linear"`` without the routing gates of mixture-of-experts blocks: a router's output (routing
    logits, or a tuple with the chosen experts) is not a projection to unlearn in, and some routers subclass
    ``nn.Linear`` while returning a tuple, which a LoRA layer cannot wrap. Fused expert weights are parameters, not
    linear modules, so "all-linear" leaves them out; a warning names PEFT's ``target_parameters`` for them."""
    expanded = _maybe_include_all_linear_layers(dataclasses.replace(config), model).target_modules
    blocks = mixture_of_experts_blocks(model)
    if not blocks:
        return set(expanded)
    gates = {name for name in expanded if name.rsplit(".", 1)[0] in blocks}
    if gates:
        logger.info("'all-linear' leaves out %d mixture-of-experts routing gates (e.g. %s)", len(gates), min(gates))
    fused = [f"{block}.experts.{name}" for block in blocks
             for name, weight in model.get_submodule(f"{block}.experts").named_parameters(recurse=False)
             if weight.dim() > 2]
    if fused and not config.target_parameters:
        example = sorted({re.sub(r"^.*?\.\d+\.", "", name) for name in fused})  # relative to the decoder layer
        logger.warning(
            "'all-linear' adapts linear modules only: %d fused expert weights of mixture-of-experts blocks (e.g. %s) "
            "are parameters and stay untouched; add them with target_parameters=%r",
            len(fused), fused[0], example,
        )
    return set(expanded) - gates


def load_uipe_keys_through_transformers() -> None:
    """Let transformers' ``load_adapter`` read UIPE checkpoints.

    transformers renames a checkpoint's adapter keys into the model's (``...lora_A.weight`` ->
    ``...lora_A.<adapter>.weight``) by the method's registered prefix, ``uipe_lora_``; UIPE checkpoints keep LoRA's
    names, so nothing matched and the adapter silently stayed at its initialisation. PEFT builds that renaming in one
    function, which is wrapped here to add LoRA's prefix for UIPE configs (idempotent).
    """
    from peft.utils import transformers_weight_conversion as conversion
    from transformers.core_model_loading import WeightRenaming

    original = conversion.build_peft_weight_mapping
    if getattr(original, "_reads_uipe_keys", False):
        return

    def build_peft_weight_mapping(weight_conversions, adapter_name: str, peft_config=None):
        mapping = original(weight_conversions, adapter_name, peft_config=peft_config)
        if mapping and isinstance(peft_config, UIPELoraConfig):
            lora_keys = rf"({LORA_PREFIX}[^\.]*)"
            # Beside the prefix renaming, before the model's own conversions.
            mapping.insert(2, WeightRenaming(source_patterns=lora_keys, target_patterns=rf"\1.{adapter_name}"))
        return mapping

    build_peft_weight_mapping._reads_uipe_keys = True
    conversion.build_peft_weight_mapping = build_peft_weight_mapping


def uipe_adapter(model: nn.Module, adapter_name: str | None) -> tuple[str, UIPELoraConfig]:
    """The name and config of a UIPE adapter of ``model`` (the active one by default), or a clear error."""
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"expected a PeftModel with a UIPELoraConfig adapter (peft.get_peft_model(model, UIPELoraConfig(...))), "
            f"got {type(model).__name__}"
        )
    adapter_name = adapter_name or model.active_adapter
    if adapter_name not in model.peft_config:
        raise ValueError(f"the model has no adapter {adapter_name!r}; it has {sorted(model.peft_config)}")
    config = model.peft_config[adapter_name]
    if not isinstance(config, UIPELoraConfig):
        raise TypeError(
            f"adapter {adapter_name!r} is a {type(config).__name__}, not a UIPELoraConfig; train the unlearning "
            "adapter with UIPELoraConfig (extrapolation_alpha=0 trains exactly like LoRA)"
        )
    return adapter_name, config


def extrapolate(model: PeftModel, alpha: float, adapter_name: str | None = None) -> PeftModel:
    """Set the UIPE factor of a trained adapter: its update becomes ``(1 + alpha)`` times the trained one.

    No retraining and no data: only the scaling of every LoRA layer changes, and the adapter's config records
    ``alpha`` so that ``save_pretrained`` keeps it. Returns ``model`` (changed in place).
    """
    alpha = check_extrapolation_alpha(alpha)
    adapter_name, config = uipe_adapter(model, adapter_name)
    layers = list(lora_layers(model, adapter_name))
    if not layers:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA layers to extrapolate")
    for _, layer in layers:
        if adapter_name in layer.merged_adapters:
            raise ValueError(
                f"adapter {adapter_name!r} is merged into the base weights; call model.unmerge_adapter() before "
                "extrapolate() (or extrapolate first, then merge)"
            )
    for _, layer in layers:
        set_layer_extrapolation(layer, adapter_name, alpha)
    config.extrapolation_alpha = alpha
    logger.info("UIPE adapter %s extrapolated with alpha %.3g over %d layers", adapter_name, alpha, len(layers))
    return model


def export_lora(model: PeftModel, path: str | Path, adapter_name: str | None = None) -> Path:
    """Write the UIPE adapter as a plain LoRA adapter with the factor folded into ``lora_B``.

    The result loads with stock PEFT (``PeftModel.from_pretrained``) with this library not installed, and gives the
    extrapolated model's outputs: the update is linear in ``lora_B`` (weight and ``lora_bias``), so
    ``scaling * (1 + alpha) * B A == scaling * ((1 + alpha) B) A``. ``path`` must be a new or empty
    folder, or an earlier export (which is replaced): another adapter's files there are never overwritten.
    """
    adapter_name, config = uipe_adapter(model, adapter_name)
    factor = 1.0 + config.extrapolation_alpha
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
    tuner_cls = type(model.base_model)
    folded = 0
    for module_name, layer in lora_layers(model, adapter_name):
        for parameter_name in update_b_parameter_names(layer, adapter_name):
            key = tuner_cls._remove_adapter_name_from_key(f"{module_name}.{parameter_name}", adapter_name)
            if key not in state_dict:
                raise RuntimeError(f"the adapter state dict lacks {key}; cannot fold the UIPE factor into it")
            state_dict[key] = (state_dict[key] * factor).contiguous()
            folded += 1
    if not folded:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA B weights to export")

    lora_config = LoraConfig(
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig) if f.init and f.name != "peft_type"}
    )

    with staged_output(path) as folder:
        lora_config.save_pretrained(folder)
        save_file(state_dict, str(folder / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    logger.info("exported UIPE adapter %s (factor %.3g) as plain LoRA to %s", adapter_name, factor, path)
    return Path(path)
