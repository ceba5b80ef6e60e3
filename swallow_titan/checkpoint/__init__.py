"""Checkpoints: crash-safe DCP writes and resume (``atomic``, ``integrity``, ``rng``)."""
