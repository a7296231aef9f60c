"""Placeholder: filled in by the gblending work."""
