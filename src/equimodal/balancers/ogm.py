"""Placeholder: filled in by the ogm work."""
