"""Experiments: tracked runs, sweeps, reports."""

from formerlab.experiments.run import run_training
from formerlab.experiments.sweep import load_sweep, run_sweep
from formerlab.experiments.tracking import MLflowTracker, make_tracker

__all__ = ["MLflowTracker", "load_sweep", "make_tracker", "run_sweep", "run_training"]
