"""Placeholder: the kinetics_sounds loader is being written."""
