"""UIPE: extrapolation of an unlearning LoRA update by (1 + alpha) (Wang, Zhang et al. 2025, arXiv 2503.04693)."""

from ...registration import register_method
from .config import UIPELoraConfig
from .model import UIPELoraModel, export_lora, extrapolate, load_uipe_keys_through_transformers
from .selection import AlphaSelection, select_alpha

__all__ = ["AlphaSelection", "UIPELoraConfig", "UIPELoraModel", "export_lora", "extrapolate", "select_alpha"]

register_method(name="uipe_lora", config_cls=UIPELoraConfig, model_cls=UIPELoraModel)
load_uipe_keys_through_transformers()
