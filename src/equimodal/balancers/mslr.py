"""Placeholder: filled in by the mslr work."""
