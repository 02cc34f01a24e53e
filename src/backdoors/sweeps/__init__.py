"""Experiment grids: grid files -> content-addressed, resumable cells run by an engine."""

from backdoors.sweeps.sweep import SweepInterrupted, sweep

__all__ = ["SweepInterrupted", "sweep"]
