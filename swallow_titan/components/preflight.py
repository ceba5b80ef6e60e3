"""Everything a config must pass before a run starts (and before a plan is shown).

``check_job_config`` runs in ``swallow_titan.plan`` and before training
starts, so a config that cannot work fails early, naming the file and key.
It runs the value checks of :mod:`swallow_titan.config.checks` and then the
checks that need more than the config, each done by the module that owns the
thing checked: the flavor (``model.args``), data sources (``data.sources``),
the tokenizer (``data.tokenizer``), HF folders (``hf``), checkpoints
(``checkpoint``) and the device.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from typing import Any

from swallow_titan.checkpoint.dcp_reader import checkpoint_steps
from swallow_titan.config.checks import Layout, check_values
from swallow_titan.config.errors import ConfigError, config_error
from swallow_titan.config.paths import RunPaths
from swallow_titan.config.sections import FLOAT8_CONVERTER, FUSED_LOSS, TRITON_NORM
from swallow_titan.data.sources import (
    DataSourceError,
    check_data_options,
    check_source,
    local_files,
)
from swallow_titan.data.stages import check_stages
from swallow_titan.data.tokenizer import TokenizerFileError, load_tokenizer
from swallow_titan.eval import EvalUnavailableError, require_lm_eval
from swallow_titan.hf.config import HFConfigError, check_hf_config_matches_flavor
from swallow_titan.hf.export import ExportError, parse_size
from swallow_titan.hf.weights import HFWeightsError, check_hf_tensors, list_safetensors
from swallow_titan.model.family import LLAMA, family_of_config, is_moe


def model_args(config, source: str) -> Any:
    """The flavor's arguments (a deep copy), updated from the config.

    The flavors are those of the family ``[model] name`` chooses (Llama-3.1's
    or Qwen3's, ``swallow_titan.model.family``).
    """
    family = family_of_config(config)
    if config.model.flavor not in family.flavors:
        raise config_error(
            source,
            "model.flavor",
            f"unknown {family.label} flavor {config.model.flavor!r} for model.name "
            f"{config.model.name!r}; expected one of {sorted(family.flavors)}",
        )
    args = copy.deepcopy(family.flavors[config.model.flavor])
    args.update_from_config(config)
    return args


def check_structure(config, world_size: int, source: str) -> Layout:
    """Checks that need no file: names, layouts, sizes. Returns the layout."""
    layout = check_values(config, world_size, source)
    args = model_args(config, source)
    _check_model(config, args, layout, source)
    _check_sources(config, source)
    _check_checkpoint_device(config, source)
    try:
        parse_size(config.hf.export_max_shard_size)
    except ExportError as e:
        raise config_error(source, "hf.export_max_shard_size", str(e)) from None
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
            str(config_error(source, "checkpoint.initial_load_path", f"{load_path!r} is not a folder"))
        )
    problems += _hf_load_path_problems(config, source)
    if config.metrics.enable_wandb and importlib.util.find_spec("wandb") is None:
        problems.append(
            str(
                config_error(
                    source,
                    "metrics.enable_wandb",
                    "needs the wandb package: pip install 'swallow-titan[wandb]'",
                )
            )
        )
    if config.eval.enable:
        try:
            require_lm_eval()
        except EvalUnavailableError as e:
            problems.append(str(config_error(source, "eval.enable", str(e))))
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


def _check_model(config, args: Any, layout: Layout, source: str) -> None:
    if family_of_config(config) is not LLAMA:
        _check_qwen3(config, args, layout, source)
    for name, heads in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads)):
        if heads % layout.tp:
            raise config_error(
                source,
                "parallelism.tensor_parallel_degree",
                f"{layout.tp} does not divide the flavor's {name} = {heads}",
            )
    if args.attn_mask_type == "block_causal" and args.attn_type == "sdpa":
        raise config_error(
            source,
            "model.attn_mask_type",
            "'block_causal' needs model.attn_type 'flex' or 'varlen' (SDPA has no "
            "document mask)",
        )


def _check_sources(config, source: str) -> None:
    """Each source's and each validation set's fields, checked by ``data.sources``."""
    entries = [(f"{source}: data.sources[{i}]", s) for i, s in enumerate(config.data.sources)]
    if config.validation.enable:
        entries += [
            (f"{source}: validation.sets[{i}]", s) for i, s in enumerate(config.validation.sets)
        ]
    try:
        for where, s in entries:
            check_source(s, where)
        check_data_options(config.data, f"{source}: data")
        check_stages(config.data.sources, config.data.stages, config.training.steps,
                     f"{source}: data")
    except DataSourceError as e:
        raise ConfigError(str(e)) from None


def _check_qwen3(config, args: Any, layout: Layout, source: str) -> None:
    """What the Qwen3 family does not (yet) do that Llama does."""
    if layout.pp > 1:
        raise config_error(
            source,
            "parallelism.pipeline_parallel_degree",
            f"{layout.pp}: torchtitan's Qwen3 model has no pipeline split; use 1",
        )
    ep = config.parallelism.expert_parallel_degree
    etp = config.parallelism.expert_tensor_parallel_degree
    local_batch = config.training.local_batch_size
    if layout.tp > 1 and ep > 1 and etp == 1 and local_batch > 1:
        # torchtitan 0.2.2 (TP borrowed for EP): each TP rank sends an equal
        # part of the flattened batch x sequence tokens to the experts, but
        # the MoE input's gradient is kept as replicated and then cut along
        # the sequence: with more than one sequence per micro-batch, part of
        # the experts' input gradient is lost (measured: losses off the
        # one-process ones by 5e-4 after one step; equal with local_batch_size 1).
        raise config_error(
            source,
            "parallelism.expert_parallel_degree",
            f"{ep} with tensor_parallel_degree {layout.tp} and "
            f"expert_tensor_parallel_degree 1 (experts split over the TP ranks): "
            f"torchtitan 0.2.2 gets the gradient below the experts wrong when a "
            f"micro-batch holds more than one sequence (training.local_batch_size = "
            f"{local_batch}); use expert parallelism over data-parallel ranks only "
            "(tensor_parallel_degree 1), or training.local_batch_size = 1",
        )
    if ep > 1 and not is_moe(args):
        raise config_error(
            source,
            "parallelism.expert_parallel_degree",
            f"{ep}, but flavor {config.model.flavor!r} is dense (no experts); use 1",
        )
    if is_moe(args) and args.moe_args.num_experts % ep:
        raise config_error(
            source,
            "parallelism.expert_parallel_degree",
            f"{ep} does not divide the flavor's {args.moe_args.num_experts} experts",
        )
    ac = config.activation_checkpoint
    if ep > 1 and ac.mode == "selective" and ac.selective_ac_option == "op":
        # Per-op selective checkpointing replays a block's ops in backward by
        # count; the experts' own FSDP group all-gathers inside the
        # recomputation but not inside the forward, so the replay finds an
        # all-gather it never stored and the backward stops (torchtitan issue
        # #3427; a 2-process gloo run of tiny_moe with EP 2 fails so). It is
        # FSDP's hook order, not the device: GPUs are affected the same way.
        raise config_error(
            source,
            "activation_checkpoint.selective_ac_option",
            f"'op' (activation_checkpoint.mode = 'selective') with "
            f"parallelism.expert_parallel_degree = {ep}: the backward fails, per-op "
            "selective checkpointing cannot replay the experts' FSDP all-gather "
            "(torchtitan issue #3427); use activation_checkpoint.mode = 'full', a "
            "layer count for selective_ac_option, or expert_parallel_degree = 1",
        )


def _check_tokenizer(config, args: Any, source: str) -> None:
    try:
        tokenizer = load_tokenizer(config.model.hf_assets_path, config.model.tokenizer_kind)
    except (TokenizerFileError, OSError) as e:
        raise config_error(source, "model.hf_assets_path", str(e)) from None
    if tokenizer.get_vocab_size() > args.vocab_size:
        raise config_error(
            source,
            "model.hf_assets_path",
            f"the tokenizer has {tokenizer.get_vocab_size():,} tokens but flavor "
            f"{config.model.flavor!r} has vocab_size {args.vocab_size:,}",
        )


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


def _check_checkpoint_device(config, source: str) -> None:
    c = config.checkpoint
    if c.enable and c.async_mode == "async_with_pinned_mem":
        from swallow_titan import DEVICE_TYPE

        if DEVICE_TYPE == "cpu":
            raise config_error(
                source,
                "checkpoint.async_mode",
                "'async_with_pinned_mem' stages through pinned GPU memory and needs a "
                "GPU; on CPU use 'async' or 'disabled'",
            )


def _check_float8(config, source: str) -> None:
    if FLOAT8_CONVERTER not in config.model.converters:
        return
    from swallow_titan import DEVICE_TYPE

    f8 = config.quantize.linear.float8
    if DEVICE_TYPE == "cpu" and not f8.emulate:
        raise config_error(
            source,
            "model.converters",
            "float8 needs an SM89+ GPU; on CPU set "
            "quantize.linear.float8.emulate = true (for testing only)",
        )
    # Without an SM89+ GPU torchtitan's converter allows emulation in eager mode only.
    if DEVICE_TYPE == "cpu" and config.compile.enable and "model" in config.compile.components:
        raise config_error(
            source,
            "quantize.linear.float8.emulate",
            "emulated float8 runs only without compiling the model (torchtitan "
            "refuses it); on CPU set compile.enable = false or remove \"model\" from "
            "compile.components",
        )


def _check_kernels_device(config, source: str) -> None:
    from kernels import runtime
    from swallow_titan import DEVICE_TYPE

    k = config.kernels
    uses_triton = k.rmsnorm == TRITON_NORM or k.loss == FUSED_LOSS
    if uses_triton and DEVICE_TYPE == "cpu" and not runtime.INTERPRET:
        raise config_error(
            source,
            "kernels",
            f"rmsnorm = {k.rmsnorm!r}, loss = {k.loss!r} need a GPU "
            "for Triton; on CPU set TRITON_INTERPRET=1 in the environment (slow, for "
            'testing) or use rmsnorm = "torch" and loss = "torch"',
        )


def _hf_load_path_problems(config, source: str) -> list[str]:
    """``hf.load_path`` must match the flavor - unless the run resumes and never reads it."""
    path = config.hf.load_path
    if not path:
        return []
    if config.checkpoint.enable and checkpoint_steps(RunPaths.of(config).checkpoints):
        return []
    if not os.path.isdir(path):
        return [str(config_error(source, "hf.load_path", f"{path!r} is not a folder"))]
    try:
        args = model_args(config, source)
        check_hf_config_matches_flavor(path, args, config.model.flavor)
        check_hf_tensors(list_safetensors(path), args, path)
    except (HFConfigError, HFWeightsError) as e:
        return [str(config_error(source, "hf.load_path", str(e)))]
    return []
