"""The model families swallow-titan trains, chosen by ``[model] name``.

A family is what differs between Llama-3.1 and Qwen3 for everything around
the model: its arguments class and flavors, the module the TrainSpec builds,
torchtitan's state-dict adapter (HF names), the parallelisation recipe and the
optimizer builder. Code that needs one of these asks the family of a config
(:func:`family_of_config`) or of model arguments (:func:`family_of_args`)
instead of importing Llama's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn
from torchtitan.components.optimizer import (
    build_optimizers,
    build_optimizers_with_moe_load_balancing,
)
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.models.qwen3.model.state_dict_adapter import Qwen3StateDictAdapter

from swallow_titan.config.sections import MODEL_NAME, MODEL_NAMES, QWEN3_MODEL_NAME
from swallow_titan.model.args import FLAVORS, SwallowModelArgs
from swallow_titan.model.parallelize import parallelize_swallow, parallelize_swallow_qwen3
from swallow_titan.model.qwen3 import QWEN3_FLAVORS, SwallowQwen3Model, SwallowQwen3ModelArgs
from swallow_titan.model.transformer import SwallowTransformer


@dataclass(frozen=True)
class ModelFamily:
    """One trainable model family: the TrainSpec's model parts and what HF interop needs."""

    model_name: str
    """``[model] name`` of the family's TrainSpec."""
    label: str
    """How docs, logs and model cards name it."""
    args_cls: type
    flavors: Mapping[str, Any]
    model_cls: type[nn.Module]
    state_dict_adapter: type
    parallelize_fn: Callable[..., nn.Module]
    pipelining_fn: Callable[..., Any] | None
    """torchtitan's pipeline splitter, or None where the family has none."""
    build_optimizers_fn: Callable[..., Any]


LLAMA = ModelFamily(
    model_name=MODEL_NAME,
    label="Llama-3.1",
    args_cls=SwallowModelArgs,
    flavors=FLAVORS,
    model_cls=SwallowTransformer,
    state_dict_adapter=Llama3StateDictAdapter,
    parallelize_fn=parallelize_swallow,
    pipelining_fn=pipeline_llm,
    build_optimizers_fn=build_optimizers,
)

QWEN3 = ModelFamily(
    model_name=QWEN3_MODEL_NAME,
    label="Qwen3",
    args_cls=SwallowQwen3ModelArgs,
    flavors=QWEN3_FLAVORS,
    model_cls=SwallowQwen3Model,
    state_dict_adapter=Qwen3StateDictAdapter,
    parallelize_fn=parallelize_swallow_qwen3,
    # As torchtitan's own qwen3 TrainSpec: no pipeline parallelism.
    pipelining_fn=None,
    # torchtitan 0.2.2's qwen3 TrainSpec builds plain optimizers, so the hook
    # that moves the MoE expert bias is never registered (fixed upstream in
    # PR #3666); llama4/deepseek_v3 use this builder, and so do we.
    build_optimizers_fn=build_optimizers_with_moe_load_balancing,
)

FAMILIES: dict[str, ModelFamily] = {f.model_name: f for f in (LLAMA, QWEN3)}
assert tuple(FAMILIES) == MODEL_NAMES


def family_of_name(model_name: str) -> ModelFamily:
    """The family of a ``[model] name``; ``KeyError`` naming the known ones."""
    try:
        return FAMILIES[model_name]
    except KeyError:
        raise KeyError(
            f"model name {model_name!r}: expected one of {sorted(FAMILIES)}"
        ) from None


def family_of_config(config: Any) -> ModelFamily:
    """The family a job config trains (its ``[model] name``)."""
    return family_of_name(config.model.name)


def family_of_args(args: Any) -> ModelFamily:
    """The family whose arguments class ``args`` is (or derives from)."""
    for family in FAMILIES.values():
        if isinstance(args, family.args_cls):
            return family
    # torchtitan's own argument classes (e.g. a test building a plain model).
    from torchtitan.models.llama3.model.args import TransformerModelArgs
    from torchtitan.models.qwen3 import Qwen3ModelArgs

    if isinstance(args, Qwen3ModelArgs):
        return QWEN3
    if isinstance(args, TransformerModelArgs):
        return LLAMA
    raise TypeError(f"no model family has arguments of type {type(args).__name__}")


def is_moe(args: Any) -> bool:
    """Whether the model's feed-forward layers are Mixture-of-Experts."""
    return bool(getattr(args, "moe_enabled", False))
