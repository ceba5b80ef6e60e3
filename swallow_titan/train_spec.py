"""The TrainSpecs: what torchtitan's Trainer builds for ``[model] name``.

Importing this module registers one spec per model family
(``model/family.py``): ``swallow`` (Llama-3.1: torchtitan's llama3
Transformer with ``[kernels]`` switched in, ``model/transformer.py``) and
``swallow_qwen3`` (Qwen3 dense and MoE: torchtitan's qwen3 model,
``model/qwen3.py``). Optimizer and LR schedule are torchtitan's (for Qwen3
with the MoE load-balancing hook); parallelisation is the family's torchtitan
recipe plus the gloo fix (``model/parallelize.py``); everything else is
shared: tokenizer, dataloader, validator and metrics are
swallow-titan's (``data/``, ``validation.py``, ``metrics.py``); the loss
(``loss.py``) is torchtitan's summed cross-entropy or the fused output-layer
loss, with z-loss (logged by ``metrics.py`` as train/z_loss).
"""

from __future__ import annotations

from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.protocols.train_spec import (
    TrainSpec,
    _extra_train_specs,
    register_train_spec,
)

from swallow_titan.config.sections import MODEL_NAME
from swallow_titan.data.dataloader import build_training_dataloader
from swallow_titan.data.tokenizer import build_tokenizer
from swallow_titan.components.loss import build_swallow_loss
from swallow_titan.components.metrics import build_metrics_processor
from swallow_titan.model.family import FAMILIES, ModelFamily
from swallow_titan.components.validation import build_validator


def swallow_train_spec(family: ModelFamily = FAMILIES[MODEL_NAME]) -> TrainSpec:
    """The TrainSpec of one model family (Llama-3.1 by default)."""
    return TrainSpec(
        model_cls=family.model_cls,
        model_args=family.flavors,
        parallelize_fn=family.parallelize_fn,
        pipelining_fn=family.pipelining_fn,
        build_optimizers_fn=family.build_optimizers_fn,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_training_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_swallow_loss,
        build_validator_fn=build_validator,
        build_metrics_processor_fn=build_metrics_processor,
        state_dict_adapter=family.state_dict_adapter,
    )


for _name, _family in FAMILIES.items():
    if _name not in _extra_train_specs:
        register_train_spec(_name, swallow_train_spec(_family))
