"""The model as a run builds it, in-process."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torchtitan.protocols.train_spec import get_train_spec

from support import TINY_CONFIG
from swallow_titan.config.manager import load_job_config
from swallow_titan.train_spec import MODEL_NAME


def build_model(*overrides: str, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """The model (and its config) as torchtitan's Trainer builds it: the spec's
    flavor arguments updated from the config."""
    config = load_job_config(TINY_CONFIG, list(overrides))
    spec = get_train_spec(MODEL_NAME)
    args = copy.deepcopy(spec.model_args[config.model.flavor])
    args.update_from_config(config)
    with torch.device(device):
        return spec.model_cls(args), config
