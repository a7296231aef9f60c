"""Infrastructure below every layer: atomic files and readers, folder claims, signals, worker processes."""
