"""Experiments: tracked runs, sweeps, reports."""

from formerlab.experiments.run import run_training
from formerlab.experiments.tracking import MLflowTracker, make_tracker

__all__ = ["MLflowTracker", "make_tracker", "run_training"]
