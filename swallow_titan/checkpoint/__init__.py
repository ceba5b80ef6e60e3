"""Crash-safe training checkpoints.

- ``manager``: the CheckpointManager the trainer uses: write, then publish
  atomically; checked resume; safe ``keep_latest_k`` pruning.
- ``integrity``: manifests and the completeness checks, the pruning policy.
- ``rng``: every rank's random generators as a checkpoint entry.
- ``dcp_reader``: reading a torchtitan/DCP checkpoint offline, piece by piece.

Hugging Face import and export live in :mod:`swallow_titan.hf`; the run's
start rule and end-of-run export in :mod:`swallow_titan.components.start_rule` and
:mod:`swallow_titan.components.final_export`.
"""
