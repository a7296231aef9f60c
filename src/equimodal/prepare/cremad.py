"""Placeholder: the cremad preparer is being written."""
