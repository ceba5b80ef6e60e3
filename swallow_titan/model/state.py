"""The weights of a model split into parts (pipeline stages), possibly sharded.

Loading start weights (HF or DCP) fills the parts' state dict in place, each
rank holding only its shards (DTensors), and then writes it back.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)


def model_state(model_parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Every part's parameters and buffers by fully qualified name (this rank's shards)."""
    return {
        name: tensor
        for part in model_parts
        for name, tensor in get_model_state_dict(part).items()
    }


def set_model_state(model_parts: list[nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the parts; each part takes the entries it has."""
    for part in model_parts:
        set_model_state_dict(part, state, options=StateDictOptions(strict=False))
