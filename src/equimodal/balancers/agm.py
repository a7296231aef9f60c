"""Placeholder: filled in by the agm work."""
