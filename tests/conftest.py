"""Test set-up: swallow_titan must be imported before torchtitan (device selection)."""

import swallow_titan  # noqa: F401
