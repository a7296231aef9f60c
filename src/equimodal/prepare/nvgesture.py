"""Placeholder: the nvgesture preparer is being written."""
