"""Placeholder: filled in by the mmpareto work."""
