"""Placeholder: the cremad loader is being written."""
