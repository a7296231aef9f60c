"""Placeholder: the sarcasm loader is being written."""
