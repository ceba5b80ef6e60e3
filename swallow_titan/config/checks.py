"""Checks of a parsed job config that need nothing but the config: layouts, sizes, values.

These are the checks that read no file and know no model: they use only the
config's own values. The checks that need a flavor, files, a tokenizer, an HF
folder or the device live with the modules that own those, and
:mod:`swallow_titan.components.preflight` runs them all, in ``swallow_titan.plan`` and
before training starts, so a config that cannot work fails early, naming the
file and key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torchtitan.tools.logging import logger

from swallow_titan.config.errors import config_error
from swallow_titan.config.sections import FLOAT8_CONVERTER, FUSED_LOSS, MODEL_NAMES


@dataclass(frozen=True)
class Layout:
    """How a world of processes is split among the parallelisms."""

    world_size: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ranks read different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_shards(self) -> int:
        """Ranks one parameter is sharded over by FSDP (dp_shard x cp)."""
        return self.dp_shard * self.cp


def resolve_layout(config, world_size: int, source: str) -> Layout:
    """Resolve ``data_parallel_shard_degree = -1`` and check the product."""
    p = config.parallelism
    fixed = {
        "data_parallel_replicate_degree": p.data_parallel_replicate_degree,
        "context_parallel_degree": p.context_parallel_degree,
        "tensor_parallel_degree": p.tensor_parallel_degree,
        "pipeline_parallel_degree": p.pipeline_parallel_degree,
    }
    for key, degree in fixed.items():
        if degree < 1:
            raise config_error(source, f"parallelism.{key}", f"must be >= 1, got {degree}")
    others = 1
    for degree in fixed.values():
        others *= degree
    dp_shard = p.data_parallel_shard_degree
    if dp_shard == -1:
        if world_size % others:
            raise config_error(
                source,
                "parallelism",
                f"{world_size} processes cannot be split into "
                f"replicate x cp x tp x pp = {others}; use a multiple of {others} GPUs",
            )
        dp_shard = world_size // others
    elif dp_shard < 1:
        raise config_error(
            source,
            "parallelism.data_parallel_shard_degree",
            f"must be -1 (use the remaining ranks) or >= 1, got {dp_shard}",
        )
    if dp_shard * others != world_size:
        raise config_error(
            source,
            "parallelism",
            f"replicate({p.data_parallel_replicate_degree}) x "
            f"shard({dp_shard}) x cp({p.context_parallel_degree}) x "
            f"tp({p.tensor_parallel_degree}) x pp({p.pipeline_parallel_degree}) = "
            f"{dp_shard * others}, but the job has {world_size} processes",
        )
    return Layout(
        world_size=world_size,
        dp_replicate=p.data_parallel_replicate_degree,
        dp_shard=dp_shard,
        cp=p.context_parallel_degree,
        tp=p.tensor_parallel_degree,
        pp=p.pipeline_parallel_degree,
    )


def global_batch_sequences(config, layout: Layout) -> int:
    """Sequences per optimizer step (torchtitan's rule for -1)."""
    if config.training.global_batch_size < 0:
        return config.training.local_batch_size * layout.dp
    return config.training.global_batch_size


def grad_accum_steps(config, layout: Layout, source: str) -> int:
    """Micro-batches per optimizer step; errors when the batch sizes do not divide."""
    local = config.training.local_batch_size
    if local < 1:
        raise config_error(source, "training.local_batch_size", f"must be >= 1, got {local}")
    global_batch = global_batch_sequences(config, layout)
    per_microstep = local * layout.dp
    if global_batch < per_microstep or global_batch % per_microstep:
        raise config_error(
            source,
            "training.global_batch_size",
            f"{global_batch} sequences must be a "
            f"multiple of local_batch_size x data-parallel degree = {local} x "
            f"{layout.dp} = {per_microstep}",
        )
    return global_batch // per_microstep


def check_values(config, world_size: int, source: str) -> Layout:
    """The checks that need only the config's values. Returns the layout."""
    if config.model.name not in MODEL_NAMES:
        raise config_error(
            source,
            "model.name",
            f"swallow-titan trains one of {', '.join(map(repr, MODEL_NAMES))} "
            f"(Llama-3.1, Qwen3), got {config.model.name!r}",
        )
    layout = resolve_layout(config, world_size, source)
    grad_accum_steps(config, layout, source)
    if config.checkpoint.create_seed_checkpoint and (
        world_size != 1 or not config.checkpoint.enable
    ):
        raise config_error(
            source,
            "checkpoint.create_seed_checkpoint",
            "needs 1 process and checkpoint.enable = true",
        )
    _check_training(config, layout, source)
    _check_source_names(config, source)
    _check_validation_sets(config, layout, source)
    _check_checkpoint(config, source)
    _check_guard(config, source)
    _check_kernels(config, layout, source)
    _check_float8_options(config, source)
    _check_hf(config, source)
    _check_eval(config, layout, source)
    return layout


def _check_training(config, layout: Layout, source: str) -> None:
    t = config.training
    if t.steps < 1:
        raise config_error(source, "training.steps", f"must be >= 1, got {t.steps}")
    if t.seq_len < 2:
        raise config_error(source, "training.seq_len", f"must be >= 2, got {t.seq_len}")
    divisor = layout.tp * (2 * layout.cp if layout.cp > 1 else 1)
    if t.seq_len % divisor:
        raise config_error(
            source,
            "training.seq_len",
            f"{t.seq_len} must be divisible by tp x 2cp = {divisor}",
        )
    schedule_steps = config.lr_scheduler.total_steps or t.steps
    if config.lr_scheduler.warmup_steps > schedule_steps:
        # torchtitan shortens the warm-up to the schedule; say so, since it
        # is fine for a short trial run but a mistake in a real one.
        logger.warning(
            f"{source}: lr_scheduler.warmup_steps = {config.lr_scheduler.warmup_steps} "
            f"exceeds the {schedule_steps}-step LR schedule; the warm-up is "
            f"shortened to {schedule_steps} steps"
        )
    if not 0.0 <= config.lr_scheduler.min_lr_factor <= 1.0:
        raise config_error(
            source,
            "lr_scheduler.min_lr_factor",
            f"must be in [0, 1], got {config.lr_scheduler.min_lr_factor}",
        )
    v = config.validation
    if v.enable:
        if v.seq_len > t.seq_len:
            raise config_error(
                source,
                "validation.seq_len",
                f"{v.seq_len} exceeds training.seq_len "
                f"= {t.seq_len} (the model's RoPE table has seq_len positions)",
            )
        if v.freq < 1:
            raise config_error(source, "validation.freq", f"must be >= 1, got {v.freq}")


def _check_eval(config, layout: Layout, source: str) -> None:
    e = config.eval
    if not e.enable:
        return
    if not any(t.strip() for t in e.tasks):
        raise config_error(source, "eval.tasks", "name at least one lm-eval task when eval.enable")
    for key in ("freq", "batch_size", "max_gen_toks"):
        if getattr(e, key) < 1:
            raise config_error(source, f"eval.{key}", f"must be >= 1, got {getattr(e, key)}")
    if e.max_gen_toks >= config.training.seq_len:
        raise config_error(
            source,
            "eval.max_gen_toks",
            f"must be below training.seq_len ({config.training.seq_len}, the longest "
            f"sequence the model takes), got {e.max_gen_toks}",
        )
    if e.limit < 0:
        raise config_error(source, "eval.limit", f"must be >= 0 (0 = all examples), got {e.limit}")
    if e.num_fewshot < -1:
        raise config_error(
            source, "eval.num_fewshot", f"must be >= 0, or -1 for each task's own, got {e.num_fewshot}"
        )
    if layout.pp > 1 or layout.cp > 1:
        raise config_error(
            source,
            "eval.enable",
            "in-loop evaluation supports FSDP/HSDP and tensor parallel, not pipeline "
            "or context parallel",
        )


def _check_source_names(config, source: str) -> None:
    sources = config.data.sources
    if not sources:
        raise config_error(
            source, "data.sources", "no [[data.sources]] entries; add at least one"
        )
    seen: set[str] = set()
    for i, s in enumerate(sources):
        if s.name in seen:
            raise config_error(source, f"data.sources[{i}]", f"name {s.name!r} is used twice")
        seen.add(s.name)


# Set names become TensorBoard tags (val/<name>/loss) and console labels.
_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_validation_sets(config, layout: Layout, source: str) -> None:
    v = config.validation
    if v.dataset_path:
        raise config_error(
            source,
            "validation.dataset_path",
            "swallow-titan validates on labelled "
            "[[validation.sets]] (name, path or hf_dataset, sequences); move the path "
            "into a set and remove dataset_path",
        )
    if not v.enable:
        return
    if not v.sets:
        raise config_error(
            source,
            "validation.sets",
            "validation is enabled but there is no "
            "[[validation.sets]] entry; add one per held-out domain or set "
            "validation.enable = false",
        )
    per_batch = v.local_batch_size * layout.dp
    seen: set[str] = set()
    for i, s in enumerate(v.sets):
        where = f"validation.sets[{i}]"
        if not _SET_NAME.match(s.name):
            raise config_error(
                source,
                f"{where}.name",
                f"{s.name!r} must start with a letter or digit and hold "
                "only letters, digits, '_', '.' and '-' (it becomes val/<name>/loss)",
            )
        if s.name in seen:
            raise config_error(source, f"{where}.name", f"{s.name!r} is used twice")
        seen.add(s.name)
        if s.weight != 1.0 or s.max_epochs != 0.0:
            raise config_error(
                source,
                where,
                "weight and max_epochs have no meaning for a validation set "
                "(each set is read once, up to `sequences` windows); remove them",
            )
        if s.sequences < per_batch:
            raise config_error(
                source,
                f"{where}.sequences",
                f"{s.sequences} is fewer than one validation batch "
                f"(validation.local_batch_size x data-parallel degree = "
                f"{v.local_batch_size} x {layout.dp} = {per_batch})",
            )


def _check_guard(config, source: str) -> None:
    g = config.guard
    if g.max_consecutive_skips < 1:
        raise config_error(
            source,
            "guard.max_consecutive_skips",
            f"must be >= 1, got {g.max_consecutive_skips}",
        )
    if config.debug.checkpoint_publish_delay_s < 0:
        raise config_error(
            source,
            "debug.checkpoint_publish_delay_s",
            f"must be >= 0, got {config.debug.checkpoint_publish_delay_s}",
        )
    if config.debug.eval_delay_s < 0:
        raise config_error(
            source, "debug.eval_delay_s", f"must be >= 0, got {config.debug.eval_delay_s}"
        )


def _check_checkpoint(config, source: str) -> None:
    c = config.checkpoint
    if not c.enable:
        return
    if c.interval < 1:
        raise config_error(source, "checkpoint.interval", f"must be >= 1, got {c.interval}")
    if c.keep_latest_k == 1:
        raise config_error(
            source,
            "checkpoint.keep_latest_k",
            "1 is not allowed (the newest may be "
            "still writing); use 0 (keep all) or >= 2",
        )


def _check_kernels(config, layout: Layout, source: str) -> None:
    k = config.kernels
    if k.z_loss < 0:
        raise config_error(source, "kernels.z_loss", f"must be >= 0, got {k.z_loss}")
    if k.loss != FUSED_LOSS:
        return
    # The labels reach the output layer through the input dict: torchtitan hands
    # it to the first pipeline stage only and does not shard it for context
    # parallel.
    for name, degree in (
        ("pipeline_parallel_degree", layout.pp),
        ("context_parallel_degree", layout.cp),
    ):
        if degree > 1:
            raise config_error(
                source,
                "kernels.loss",
                f"{FUSED_LOSS!r} does not support "
                f'parallelism.{name} = {degree}; use loss = "torch" or degree 1',
            )
    if FLOAT8_CONVERTER in config.model.converters and not any(
        "output" in fqn for fqn in config.quantize.linear.float8.filter_fqns
    ):
        raise config_error(
            source,
            "quantize.linear.float8.filter_fqns",
            f"with kernels.loss = "
            f"{FUSED_LOSS!r} the output layer computes the loss and must stay in "
            'high precision; add "output" to filter_fqns',
        )


def _check_float8_options(config, source: str) -> None:
    """Combinations torchtitan 0.2.2's float8 converter refuses while building the model."""
    if FLOAT8_CONVERTER not in config.model.converters:
        return
    f8 = config.quantize.linear.float8
    # Float8LinearConverter asserts this: a named recipe builds torchao's config
    # from the recipe alone, which has no float8 all-gather.
    if f8.recipe_name is not None and f8.enable_fsdp_float8_all_gather:
        raise config_error(
            source,
            "quantize.linear.float8.recipe_name",
            f"{f8.recipe_name!r} cannot be combined with "
            "quantize.linear.float8.enable_fsdp_float8_all_gather = true (torchtitan "
            "refuses it). For tensorwise scaling with the float8 all-gather remove "
            "recipe_name (tensorwise is the default); for 'rowwise' set "
            "enable_fsdp_float8_all_gather = false",
        )


def _check_hf(config, source: str) -> None:
    """``[hf]`` and the torchtitan HF options it replaces."""
    c, hf = config.checkpoint, config.hf
    if c.initial_load_in_hf:
        raise config_error(
            source,
            "checkpoint.initial_load_in_hf",
            "use hf.load_path = <HF folder> "
            "instead (it checks config.json against the flavor and is never skipped "
            "silently)",
        )
    if c.last_save_in_hf:
        raise config_error(
            source,
            "checkpoint.last_save_in_hf",
            "use hf.export_at_end = true instead "
            "(a Hub-ready folder beside the checkpoints; torchtitan's HF last save has no "
            "config.json and cannot be resumed)",
        )
    if hf.load_path and c.initial_load_path:
        raise config_error(
            source,
            None,
            "hf.load_path and checkpoint.initial_load_path both name starting "
            "weights; keep one",
        )
    if c.initial_load_path and not c.initial_load_model_only:
        raise config_error(
            source,
            "checkpoint.initial_load_model_only = false",
            "starting weights are "
            "model-only; to continue a run with its optimizer state, point job.dump_folder "
            "at that run (it resumes)",
        )
    if hf.export_at_end and not c.enable:
        raise config_error(
            source,
            "hf.export_at_end",
            "exports the last checkpoint, so it needs checkpoint.enable = true",
        )
    if hf.export_at_end and c.load_only:
        raise config_error(
            source,
            "hf.export_at_end",
            "checkpoint.load_only = true saves no checkpoint "
            "to export; export an existing one with python -m swallow_titan.export",
        )
    if hf.push_to_hub and not hf.export_at_end:
        raise config_error(
            source,
            "hf.push_to_hub",
            "uploads the end-of-run export; set "
            "hf.export_at_end = true (or push later with python -m swallow_titan.export)",
        )
