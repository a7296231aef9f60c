"""Placeholder: filled in by the unimodal work."""
