"""Placeholder: the sarcasm preparer is being written."""
