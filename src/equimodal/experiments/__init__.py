"""Experiments: comparisons, studies and diagnoses, each many runs of the engine with their tables."""
