"""Checkpoints: crash-safe DCP writes and resume (``manager``, ``integrity``, ``rng``)."""
