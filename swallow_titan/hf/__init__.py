"""Hugging Face interop: weights and configuration in and out of swallow-titan.

- ``hf_config``: config.json <-> model arguments, checked against a flavor.
- ``hf_weights``: the tensors of an HF safetensors folder: listing, checks,
  the sharded load into a (FSDP/TP) model, sharded writing.
- ``run_record``: ``swallow_run.json``, what a checkpoint folder needs to be
  exported on its own (model config, tokenizer, recipe).
- ``hf_import`` / ``hf_export``: the conversions behind ``python -m
  swallow_titan.convert`` and ``python -m swallow_titan.export``.
- ``model_card`` (+ ``training_log``): the exported README.md.
- ``hub``: upload of an export to the Hugging Face Hub.
- ``atomic``: folders and files that appear complete or not at all (exports).
"""
