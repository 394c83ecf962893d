"""Training Atlas-MAG: pretraining with Accelerate from a YAML run configuration (`train`), the metrics it
logs (`plot_metrics`), fine-tuning a saved model with the Transformers `Trainer` (`finetune`), and the text
data both read (`DataSource`)."""

from .data import DataSource
from .finetune import finetune
from .loop import ConfigError, TrainConfig, config_from_dict, iterate_metrics, load_config, plot_metrics, train

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
