"""Few-shot Kalman fine-tuning of open_clip models (needs the ``clip`` extra).

    from kalman_kernels.clip import load_clip, prepare, make_task, finetune, TrainConfig

See docs/clip.md. The command-line tool is ``kalman-clip`` (``kalman_kernels.clip.cli``).
"""
from .adapters import (
    ClipAdapter,
    LinearHead,
    ProjAdapter,
    kron_factors,
    make_adapter,
    observation,
    predictive_variance,
)
from .cache import FeatureCache, FeatureSet, extract_features
from .data import DatasetError, few_shot_indices, get_dataset
from .metrics import accuracy, auroc, brier, ece, nll, reliability
from .models import (
    TINY_CONFIGS,
    ClipBundle,
    ModelLoadError,
    load_clip,
    register_tiny_configs,
    save_clip,
    text_features,
)
from .run import make_task, prepare, run_methods
from .train import Task, TrainConfig, finetune, run_gda, run_zero_shot

__all__ = ["ClipBundle", "ModelLoadError", "TINY_CONFIGS", "load_clip", "register_tiny_configs",
           "save_clip", "text_features", "DatasetError", "get_dataset", "few_shot_indices",
           "FeatureCache", "FeatureSet", "extract_features", "ClipAdapter", "LinearHead",
           "ProjAdapter", "kron_factors", "make_adapter", "observation", "predictive_variance",
           "accuracy", "auroc", "brier", "ece", "nll", "reliability", "Task", "TrainConfig",
           "finetune", "run_gda", "run_zero_shot", "prepare", "make_task", "run_methods"]
