"""peft_unlearn: knowledge editing and unlearning as Hugging Face PEFT adapters.

Importing the package registers every method with PEFT, so ``peft.get_peft_model`` and
``PeftModel.from_pretrained`` handle them like any built-in adapter.
"""

from . import registration  # noqa: F401  (checks the peft version first)
from .editing import EditResult, edit, remove_edits
from .evaluation import EvaluationReport, evaluate_editing, evaluate_unlearning, plot_tradeoff
from .requests import EditRequest, forget_requests
from .statistics import SecondMoments, attach_statistics, collect_statistics
from .tuners.alphaedit import AlphaEditConfig, MemitConfig, RomeConfig
from .tuners.grace import GraceConfig
from .tuners.uipe import UIPELoraConfig, export_lora, extrapolate, select_alpha
from .tuners.wise import WiseConfig
from .unlearning import UnlearningArguments, UnlearningTrainer, unlearn_with_lora

__version__ = "0.1.0"

__all__ = [
    "AlphaEditConfig",
    "EditRequest",
    "EditResult",
    "EvaluationReport",
    "GraceConfig",
    "MemitConfig",
    "RomeConfig",
    "SecondMoments",
    "UIPELoraConfig",
    "UnlearningArguments",
    "UnlearningTrainer",
    "WiseConfig",
    "attach_statistics",
    "collect_statistics",
    "edit",
    "evaluate_editing",
    "evaluate_unlearning",
    "export_lora",
    "extrapolate",
    "forget_requests",
    "plot_tradeoff",
    "remove_edits",
    "select_alpha",
    "unlearn_with_lora",
]
