"""The ``swallow`` TrainSpec: what torchtitan's Trainer builds for ``[model] name = "swallow"``.

Importing this module registers the spec. Model, optimizer, LR schedule and
loss are torchtitan's llama3 components; parallelisation adds the gloo fix
(``model/parallelize.py``); tokenizer, dataloader, validator and metrics are
swallow-titan's (``data/``, ``validation.py``, ``metrics.py``).
"""

from __future__ import annotations

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.models.llama3.model.model import Transformer
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.protocols.train_spec import (
    TrainSpec,
    _extra_train_specs,
    register_train_spec,
)

from swallow_titan.data.dataloader import build_dataloader
from swallow_titan.data.tokenizer import build_tokenizer
from swallow_titan.metrics import build_metrics_processor
from swallow_titan.model.args import FLAVORS
from swallow_titan.model.parallelize import parallelize_swallow
from swallow_titan.validation import build_validator

MODEL_NAME = "swallow"


def swallow_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=Transformer,
        model_args=FLAVORS,
        parallelize_fn=parallelize_swallow,
        pipelining_fn=pipeline_llm,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_cross_entropy_loss,
        build_validator_fn=build_validator,
        build_metrics_processor_fn=build_metrics_processor,
        state_dict_adapter=Llama3StateDictAdapter,
    )


if MODEL_NAME not in _extra_train_specs:
    register_train_spec(MODEL_NAME, swallow_train_spec())
