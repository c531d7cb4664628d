"""Training pipeline: run arguments, YAML/CLI configuration, text windows, and the Quiet-STaR Trainer.

Nothing in the core ``quietstar`` package imports from here.
"""

from .arguments import DataArguments, ModelArguments, QuietStarTrainingArguments
from .build import build_model, load_base_model, load_tokenizer
from .config_file import ConfigError, RunArguments, load_yaml_config, parse_config
from .data import (
    RandomWindowDataset,
    WindowCollator,
    WindowEpochCallback,
    build_datasets,
    build_window_dataset,
    load_documents,
    synthetic_arithmetic_documents,
    tokenize_documents,
)
from .trainer import QuietStarTrainer

__all__ = [
    "ConfigError",
    "DataArguments",
    "ModelArguments",
    "QuietStarTrainer",
    "QuietStarTrainingArguments",
    "RandomWindowDataset",
    "RunArguments",
    "WindowCollator",
    "WindowEpochCallback",
    "build_datasets",
    "build_model",
    "build_window_dataset",
    "load_base_model",
    "load_documents",
    "load_tokenizer",
    "load_yaml_config",
    "parse_config",
    "synthetic_arithmetic_documents",
    "tokenize_documents",
]
