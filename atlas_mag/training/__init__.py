"""Training Atlas-MAG: pretraining with Accelerate from a YAML run configuration (`train`), the metrics it
logs (`plot_metrics`), fine-tuning a saved model with the Transformers `Trainer` (`finetune`), and the text
data both read (`DataSource`)."""

from .config import ConfigError, TrainConfig, config_from_dict, load_config
from .data import DataSource
from .finetune import finetune
from .loop import train
from .metrics import iterate_metrics, plot_metrics

__all__ = [
    "ConfigError",
    "DataSource",
    "TrainConfig",
    "config_from_dict",
    "finetune",
    "iterate_metrics",
    "load_config",
    "plot_metrics",
    "train",
]
