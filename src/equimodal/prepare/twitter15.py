"""Placeholder: the twitter15 preparer is being written."""
