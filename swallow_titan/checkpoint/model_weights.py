"""Loading only the model weights of a DCP checkpoint into a (sharded) model.

Used where a run or an evaluation starts from a checkpoint's weights without
its optimizer, data or RNG state: the start rule's ``checkpoint.initial_load_path``
(``components/start_rule.py``) and ``python -m swallow_titan.evaluate``.
"""

from __future__ import annotations

import torch.distributed.checkpoint as dcp
from torch import nn

from swallow_titan.model.state import model_state, set_model_state


def load_dcp_model_weights(model_parts: list[nn.Module], path: str) -> int:
    """Load the model entries of a DCP checkpoint into a (sharded) model; collective.

    Returns the number of entries loaded.
    """
    state = model_state(model_parts)
    dcp.load(state, checkpoint_id=path)
    set_model_state(model_parts, state)
    return len(state)
