"""Placeholder: the kinetics_sounds preparer is being written."""
