"""The ``swallow`` TrainSpec: what torchtitan's Trainer builds for ``[model] name = "swallow"``.

Importing this module registers the spec. The model is torchtitan's llama3
Transformer with ``[kernels]`` switched in (``model/transformer.py``); optimizer
and LR schedule are torchtitan's; parallelisation adds the gloo fix
(``model/parallelize.py``); tokenizer, dataloader, validator and metrics are
swallow-titan's (``data/``, ``validation.py``, ``metrics.py``); the loss
(``loss.py``) is torchtitan's summed cross-entropy or the fused output-layer
loss, with z-loss (logged by ``metrics.py`` as train/z_loss).
"""

from __future__ import annotations

from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter
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
from swallow_titan.model.args import FLAVORS
from swallow_titan.model.parallelize import parallelize_swallow
from swallow_titan.model.transformer import SwallowTransformer
from swallow_titan.components.validation import build_validator


def swallow_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=SwallowTransformer,
        model_args=FLAVORS,
        parallelize_fn=parallelize_swallow,
        pipelining_fn=pipeline_llm,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_training_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_swallow_loss,
        build_validator_fn=build_validator,
        build_metrics_processor_fn=build_metrics_processor,
        state_dict_adapter=Llama3StateDictAdapter,
    )


if MODEL_NAME not in _extra_train_specs:
    register_train_spec(MODEL_NAME, swallow_train_spec())
