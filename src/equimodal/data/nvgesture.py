"""Placeholder: the nvgesture loader is being written."""
