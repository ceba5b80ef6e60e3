"""Checks of a parsed job config that need more than types: layouts, files, sizes.

``check_job_config`` runs in ``swallow_titan.plan`` and before training
starts, so a config that cannot work fails early, naming the file and key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from torchtitan.tools.logging import logger

from swallow_titan.checkpoint.dcp_reader import checkpoint_steps
from swallow_titan.checkpoint.hf_config import HFConfigError, check_hf_config_matches_flavor
from swallow_titan.checkpoint.hf_export import ExportError, parse_size
from swallow_titan.checkpoint.hf_weights import (
    HFWeightsError,
    check_hf_tensors,
    list_safetensors,
)
from swallow_titan.config.manager import ConfigError
from swallow_titan.data.sources import (
    DataSourceError,
    check_data_options,
    check_source,
    local_files,
)
from swallow_titan.data.tokenizer import (
    Llama3Tokenizer,
    TokenizerFileError,
)
from swallow_titan.model.args import FLAVORS, SwallowModelArgs

FLOAT8_CONVERTER = "quantize.linear.float8"


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
            raise ConfigError(f"{source}: parallelism.{key}: must be >= 1, got {degree}")
    others = 1
    for degree in fixed.values():
        others *= degree
    dp_shard = p.data_parallel_shard_degree
    if dp_shard == -1:
        if world_size % others:
            raise ConfigError(
                f"{source}: parallelism: {world_size} processes cannot be split into "
                f"replicate x cp x tp x pp = {others}; use a multiple of {others} GPUs"
            )
        dp_shard = world_size // others
    elif dp_shard < 1:
        raise ConfigError(
            f"{source}: parallelism.data_parallel_shard_degree: must be -1 (use the "
            f"remaining ranks) or >= 1, got {dp_shard}"
        )
    if dp_shard * others != world_size:
        raise ConfigError(
            f"{source}: parallelism: replicate({p.data_parallel_replicate_degree}) x "
            f"shard({dp_shard}) x cp({p.context_parallel_degree}) x "
            f"tp({p.tensor_parallel_degree}) x pp({p.pipeline_parallel_degree}) = "
            f"{dp_shard * others}, but the job has {world_size} processes"
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
    local = config.training.local_batch_size
    if local < 1:
        raise ConfigError(
            f"{source}: training.local_batch_size: must be >= 1, got {local}"
        )
    global_batch = global_batch_sequences(config, layout)
    per_microstep = local * layout.dp
    if global_batch < per_microstep or global_batch % per_microstep:
        raise ConfigError(
            f"{source}: training.global_batch_size: {global_batch} sequences must be a "
            f"multiple of local_batch_size x data-parallel degree = {local} x "
            f"{layout.dp} = {per_microstep}"
        )
    return global_batch // per_microstep


def model_args(config, source: str) -> SwallowModelArgs:
    """The flavor's arguments (a copy), updated from the config."""
    from dataclasses import replace

    if config.model.flavor not in FLAVORS:
        raise ConfigError(
            f"{source}: model.flavor: unknown flavor {config.model.flavor!r}; "
            f"expected one of {sorted(FLAVORS)}"
        )
    args = replace(FLAVORS[config.model.flavor])
    args.update_from_config(config)
    return args


def check_structure(config, world_size: int, source: str) -> Layout:
    """Checks that need no file: names, layouts, sizes. Returns the layout."""
    from swallow_titan.train_spec import MODEL_NAME

    if config.model.name != MODEL_NAME:
        raise ConfigError(
            f"{source}: model.name: swallow-titan trains {MODEL_NAME!r}, got "
            f"{config.model.name!r}"
        )
    args = model_args(config, source)
    layout = resolve_layout(config, world_size, source)
    grad_accum_steps(config, layout, source)
    if config.checkpoint.create_seed_checkpoint and (
        world_size != 1 or not config.checkpoint.enable
    ):
        raise ConfigError(
            f"{source}: checkpoint.create_seed_checkpoint: needs 1 process and "
            "checkpoint.enable = true"
        )
    _check_training(config, args, layout, source)
    _check_sources(config, source)
    _check_validation_sets(config, layout, source)
    _check_checkpoint(config, source)
    _check_guard(config, source)
    _check_kernels(config, layout, source)
    _check_hf(config, source)
    _check_eval(config, layout, source)
    return layout


def file_problems(config, source: str) -> list[str]:
    """What the config names but the disk lacks: tokenizer, data, weights."""
    problems = []
    try:
        _check_tokenizer(config, model_args(config, source), source)
    except ConfigError as e:
        problems.append(str(e))
    checks = [(f"{source}: data.sources[{i}]", s) for i, s in enumerate(config.data.sources)]
    if config.validation.enable:
        checks += [
            (f"{source}: validation.sets[{i}]", s)
            for i, s in enumerate(config.validation.sets)
        ]
    files: dict[str, list[str]] = {}
    for where, data_source in checks:
        if data_source.path:
            try:
                files[where] = local_files(data_source, where)
            except DataSourceError as e:
                problems.append(str(e))
    if config.validation.enable:
        problems += _held_out_problems(config, files, source)
    load_path = config.checkpoint.initial_load_path
    if load_path and not os.path.isdir(load_path):
        problems.append(
            f"{source}: checkpoint.initial_load_path: {load_path!r} is not a folder"
        )
    problems += _hf_load_path_problems(config, source)
    return problems


def check_job_config(config, world_size: int, source: str) -> Layout:
    """Everything a run on this machine needs before it starts; returns the layout."""
    layout = check_structure(config, world_size, source)
    _check_float8(config, source)
    _check_kernels_device(config, source)
    problems = file_problems(config, source)
    if problems:
        raise ConfigError("\n".join(problems))
    return layout


def _check_training(config, args: SwallowModelArgs, layout: Layout, source: str) -> None:
    t = config.training
    if t.steps < 1:
        raise ConfigError(f"{source}: training.steps: must be >= 1, got {t.steps}")
    if t.seq_len < 2:
        raise ConfigError(f"{source}: training.seq_len: must be >= 2, got {t.seq_len}")
    divisor = layout.tp * (2 * layout.cp if layout.cp > 1 else 1)
    if t.seq_len % divisor:
        raise ConfigError(
            f"{source}: training.seq_len: {t.seq_len} must be divisible by "
            f"tp x 2cp = {divisor}"
        )
    for name, heads in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads)):
        if heads % layout.tp:
            raise ConfigError(
                f"{source}: parallelism.tensor_parallel_degree: {layout.tp} does not "
                f"divide the flavor's {name} = {heads}"
            )
    if args.attn_mask_type == "block_causal" and args.attn_type == "sdpa":
        raise ConfigError(
            f"{source}: model.attn_mask_type: 'block_causal' needs model.attn_type "
            "'flex' or 'varlen' (SDPA has no document mask)"
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
        raise ConfigError(
            f"{source}: lr_scheduler.min_lr_factor: must be in [0, 1], got "
            f"{config.lr_scheduler.min_lr_factor}"
        )
    v = config.validation
    if v.enable:
        if v.seq_len > t.seq_len:
            raise ConfigError(
                f"{source}: validation.seq_len: {v.seq_len} exceeds training.seq_len "
                f"= {t.seq_len} (the model's RoPE table has seq_len positions)"
            )
        if v.freq < 1:
            raise ConfigError(f"{source}: validation.freq: must be >= 1, got {v.freq}")


def _check_eval(config, layout: Layout, source: str) -> None:
    e = config.eval
    if not e.enable:
        return
    if not e.tasks:
        raise ConfigError(f"{source}: eval.tasks: name at least one lm-eval task when eval.enable")
    for key in ("freq", "batch_size", "max_gen_toks"):
        if getattr(e, key) < 1:
            raise ConfigError(f"{source}: eval.{key}: must be >= 1, got {getattr(e, key)}")
    if e.max_gen_toks >= config.training.seq_len:
        raise ConfigError(
            f"{source}: eval.max_gen_toks: must be below training.seq_len "
            f"({config.training.seq_len}, the longest sequence the model takes), got {e.max_gen_toks}"
        )
    if e.limit < 0:
        raise ConfigError(f"{source}: eval.limit: must be >= 0 (0 = all examples), got {e.limit}")
    if e.num_fewshot < -1:
        raise ConfigError(
            f"{source}: eval.num_fewshot: must be >= 0, or -1 for each task's own, got {e.num_fewshot}"
        )
    if layout.pp > 1 or layout.cp > 1:
        raise ConfigError(
            f"{source}: eval.enable: in-loop evaluation supports FSDP/HSDP and tensor "
            "parallel, not pipeline or context parallel"
        )


def _check_tokenizer(config, args: SwallowModelArgs, source: str) -> None:
    try:
        tokenizer = Llama3Tokenizer(config.model.hf_assets_path)
    except (TokenizerFileError, OSError) as e:
        raise ConfigError(f"{source}: model.hf_assets_path: {e}") from None
    if tokenizer.get_vocab_size() > args.vocab_size:
        raise ConfigError(
            f"{source}: model.hf_assets_path: the tokenizer has "
            f"{tokenizer.get_vocab_size():,} tokens but flavor "
            f"{config.model.flavor!r} has vocab_size {args.vocab_size:,}"
        )


def _check_sources(config, source: str) -> None:
    sources = config.data.sources
    if not sources:
        raise ConfigError(
            f"{source}: data.sources: no [[data.sources]] entries; add at least one"
        )
    seen: set[str] = set()
    for i, s in enumerate(sources):
        where = f"{source}: data.sources[{i}]"
        if s.name in seen:
            raise ConfigError(f"{where}: name {s.name!r} is used twice")
        seen.add(s.name)
        try:
            check_source(s, where)
        except DataSourceError as e:
            raise ConfigError(str(e)) from None
    try:
        check_data_options(config.data, f"{source}: data")
    except DataSourceError as e:
        raise ConfigError(str(e)) from None


# Set names become TensorBoard tags (val/<name>/loss) and console labels.
_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_validation_sets(config, layout: Layout, source: str) -> None:
    v = config.validation
    if v.dataset_path:
        raise ConfigError(
            f"{source}: validation.dataset_path: swallow-titan validates on labelled "
            "[[validation.sets]] (name, path or hf_dataset, sequences); move the path "
            "into a set and remove dataset_path"
        )
    if not v.enable:
        return
    if not v.sets:
        raise ConfigError(
            f"{source}: validation.sets: validation is enabled but there is no "
            "[[validation.sets]] entry; add one per held-out domain or set "
            "validation.enable = false"
        )
    per_batch = v.local_batch_size * layout.dp
    seen: set[str] = set()
    for i, s in enumerate(v.sets):
        where = f"{source}: validation.sets[{i}]"
        if not _SET_NAME.match(s.name):
            raise ConfigError(
                f"{where}.name: {s.name!r} must start with a letter or digit and hold "
                "only letters, digits, '_', '.' and '-' (it becomes val/<name>/loss)"
            )
        if s.name in seen:
            raise ConfigError(f"{where}.name: {s.name!r} is used twice")
        seen.add(s.name)
        if s.weight != 1.0 or s.max_epochs != 0.0:
            raise ConfigError(
                f"{where}: weight and max_epochs have no meaning for a validation set "
                "(each set is read once, up to `sequences` windows); remove them"
            )
        if s.sequences < per_batch:
            raise ConfigError(
                f"{where}.sequences: {s.sequences} is fewer than one validation batch "
                f"(validation.local_batch_size x data-parallel degree = "
                f"{v.local_batch_size} x {layout.dp} = {per_batch})"
            )
        try:
            check_source(s, where)
        except DataSourceError as e:
            raise ConfigError(str(e)) from None


def _held_out_problems(config, files: dict[str, list[str]], source: str) -> list[str]:
    """Validation sets that read what training reads are not held out."""
    problems = []
    train = [(f"{source}: data.sources[{i}]", s) for i, s in enumerate(config.data.sources)]
    for i, vset in enumerate(config.validation.sets):
        where = f"{source}: validation.sets[{i}]"
        mine = {os.path.realpath(f) for f in files.get(where, [])}
        for train_where, t in train:
            shared = mine & {os.path.realpath(f) for f in files.get(train_where, [])}
            same_hub = vset.hf_dataset and (
                (vset.hf_dataset, vset.hf_config, vset.split, vset.revision)
                == (t.hf_dataset, t.hf_config, t.split, t.revision)
            )
            if shared or same_hub:
                what = sorted(shared)[0] if shared else f"hf_dataset {vset.hf_dataset!r}"
                problems.append(
                    f"{where} '{vset.name}': reads {what}, which "
                    f"{train_where.split(': ', 1)[-1]} '{t.name}' trains on; validation "
                    "data must be held out (use separate files or another split)"
                )
    return problems


def _check_guard(config, source: str) -> None:
    g = config.guard
    if g.max_consecutive_skips < 1:
        raise ConfigError(
            f"{source}: guard.max_consecutive_skips: must be >= 1, got "
            f"{g.max_consecutive_skips}"
        )
    if config.debug.checkpoint_publish_delay_s < 0:
        raise ConfigError(
            f"{source}: debug.checkpoint_publish_delay_s: must be >= 0, got "
            f"{config.debug.checkpoint_publish_delay_s}"
        )


def _check_checkpoint(config, source: str) -> None:
    c = config.checkpoint
    if not c.enable:
        return
    if c.interval < 1:
        raise ConfigError(f"{source}: checkpoint.interval: must be >= 1, got {c.interval}")
    if c.keep_latest_k == 1:
        raise ConfigError(
            f"{source}: checkpoint.keep_latest_k: 1 is not allowed (the newest may be "
            "still writing); use 0 (keep all) or >= 2"
        )
    if c.async_mode == "async_with_pinned_mem":
        from swallow_titan import DEVICE_TYPE

        if DEVICE_TYPE == "cpu":
            raise ConfigError(
                f"{source}: checkpoint.async_mode: 'async_with_pinned_mem' stages "
                "through pinned GPU memory and needs a GPU; on CPU use 'async' or "
                "'disabled'"
            )


def _check_float8(config, source: str) -> None:
    if FLOAT8_CONVERTER not in config.model.converters:
        return
    from swallow_titan import DEVICE_TYPE

    f8 = config.quantize.linear.float8
    if DEVICE_TYPE == "cpu" and not f8.emulate:
        raise ConfigError(
            f"{source}: model.converters: float8 needs an SM89+ GPU; on CPU set "
            "quantize.linear.float8.emulate = true (for testing only)"
        )


def _check_kernels(config, layout: Layout, source: str) -> None:
    from swallow_titan.model.transformer import FUSED_LOSS

    k = config.kernels
    if k.z_loss < 0:
        raise ConfigError(f"{source}: kernels.z_loss: must be >= 0, got {k.z_loss}")
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
            raise ConfigError(
                f"{source}: kernels.loss: {FUSED_LOSS!r} does not support "
                f'parallelism.{name} = {degree}; use loss = "torch" or degree 1'
            )
    if FLOAT8_CONVERTER in config.model.converters and not any(
        "output" in fqn for fqn in config.quantize.linear.float8.filter_fqns
    ):
        raise ConfigError(
            f"{source}: quantize.linear.float8.filter_fqns: with kernels.loss = "
            f"{FUSED_LOSS!r} the output layer computes the loss and must stay in "
            'high precision; add "output" to filter_fqns'
        )


def _check_kernels_device(config, source: str) -> None:
    from kernels import runtime
    from swallow_titan import DEVICE_TYPE
    from swallow_titan.model.transformer import FUSED_LOSS, TRITON_NORM

    k = config.kernels
    uses_triton = k.rmsnorm == TRITON_NORM or k.loss == FUSED_LOSS
    if uses_triton and DEVICE_TYPE == "cpu" and not runtime.INTERPRET:
        raise ConfigError(
            f"{source}: kernels: rmsnorm = {k.rmsnorm!r}, loss = {k.loss!r} need a GPU "
            "for Triton; on CPU set TRITON_INTERPRET=1 in the environment (slow, for "
            'testing) or use rmsnorm = "torch" and loss = "torch"'
        )


def _check_hf(config, source: str) -> None:
    """``[hf]`` and the torchtitan HF options it replaces."""
    c, hf = config.checkpoint, config.hf
    if c.initial_load_in_hf:
        raise ConfigError(
            f"{source}: checkpoint.initial_load_in_hf: use hf.load_path = <HF folder> "
            "instead (it checks config.json against the flavor and is never skipped "
            "silently)"
        )
    if c.last_save_in_hf:
        raise ConfigError(
            f"{source}: checkpoint.last_save_in_hf: use hf.export_at_end = true instead "
            "(a Hub-ready folder beside the checkpoints; torchtitan's HF last save has no "
            "config.json and cannot be resumed)"
        )
    if hf.load_path and c.initial_load_path:
        raise ConfigError(
            f"{source}: hf.load_path and checkpoint.initial_load_path both name starting "
            "weights; keep one"
        )
    if c.initial_load_path and not c.initial_load_model_only:
        raise ConfigError(
            f"{source}: checkpoint.initial_load_model_only = false: starting weights are "
            "model-only; to continue a run with its optimizer state, point job.dump_folder "
            "at that run (it resumes)"
        )
    if hf.export_at_end and not c.enable:
        raise ConfigError(
            f"{source}: hf.export_at_end: exports the last checkpoint, so it needs "
            "checkpoint.enable = true"
        )
    if hf.export_at_end and c.load_only:
        raise ConfigError(
            f"{source}: hf.export_at_end: checkpoint.load_only = true saves no checkpoint "
            "to export; export an existing one with python -m swallow_titan.export"
        )
    if hf.push_to_hub and not hf.export_at_end:
        raise ConfigError(
            f"{source}: hf.push_to_hub: uploads the end-of-run export; set "
            "hf.export_at_end = true (or push later with python -m swallow_titan.export)"
        )
    try:
        parse_size(hf.export_max_shard_size)
    except ExportError as e:
        raise ConfigError(f"{source}: hf.export_max_shard_size: {e}") from None


def _hf_load_path_problems(config, source: str) -> list[str]:
    """``hf.load_path`` must match the flavor - unless the run resumes and never reads it."""
    path = config.hf.load_path
    if not path:
        return []
    folder = os.path.join(config.job.dump_folder, config.checkpoint.folder)
    if config.checkpoint.enable and checkpoint_steps(folder):
        return []
    if not os.path.isdir(path):
        return [f"{source}: hf.load_path: {path!r} is not a folder"]
    try:
        args = model_args(config, source)
        check_hf_config_matches_flavor(path, args, config.model.flavor)
        check_hf_tensors(list_safetensors(path), args, path)
    except (HFConfigError, HFWeightsError) as e:
        return [f"{source}: hf.load_path: {e}"]
    return []
