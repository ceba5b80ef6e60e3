"""Checkpoints in and out of swallow-titan.

Crash-safe training checkpoints:

- ``manager``: the CheckpointManager the trainer uses: write, then publish
  atomically; checked resume; safe ``keep_latest_k`` pruning.
- ``integrity``: manifests and the completeness checks, the pruning policy.
- ``rng``: every rank's random generators as a checkpoint entry.

Hugging Face import and export:

- ``hf_config``: config.json <-> model arguments, checked against a flavor.
- ``hf_weights``: the tensors of an HF safetensors folder: listing, checks,
  the sharded load into a (FSDP/TP) model, sharded writing.
- ``dcp_reader``: reading a torchtitan/DCP checkpoint offline, piece by piece.
- ``run_record``: ``swallow_run.json``, what a checkpoint folder needs to be
  exported on its own (model config, tokenizer, recipe).
- ``start``: the start rule of a run (resume, else HF weights, else random).
- ``hf_import`` / ``hf_export``: the conversions behind ``python -m
  swallow_titan.convert`` and ``python -m swallow_titan.export``.
- ``model_card`` (+ ``training_log``): the exported README.md.
- ``hub``: upload of an export to the Hugging Face Hub.
- ``atomic``: folders and files that appear complete or not at all (exports).
"""
