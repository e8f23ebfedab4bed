"""Training: typed configs, the loop, checkpoints, evaluation."""

from formerlab.train.checkpoint import CheckpointError, load_run
from formerlab.train.config import ConfigError, RunConfig, load_config, validate_config
from formerlab.train.evaluate import evaluate
from formerlab.train.loop import TrainingError, TrainResult, train
from formerlab.train.tracker import Tracker

__all__ = [
    "CheckpointError", "ConfigError", "RunConfig", "TrainResult", "Tracker", "TrainingError",
    "evaluate", "load_config", "load_run", "train", "validate_config",
]
