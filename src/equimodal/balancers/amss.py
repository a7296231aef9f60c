"""Placeholder: filled in by the amss work."""
