"""Placeholder: filled in by the pmr work."""
