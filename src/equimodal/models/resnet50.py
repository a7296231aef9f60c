"""Placeholder: the resnet50 encoder is being written."""
