"""Placeholder: the twitter15 loader is being written."""
