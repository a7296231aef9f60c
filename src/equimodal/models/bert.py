"""Placeholder: the bert encoder is being written."""
