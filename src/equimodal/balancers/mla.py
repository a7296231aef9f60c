"""Placeholder: filled in by the mla work."""
