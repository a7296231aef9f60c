"""Placeholder: the i3d encoder is being written."""
