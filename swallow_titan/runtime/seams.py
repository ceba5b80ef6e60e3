"""Every seam between swallow-titan and torchtitan / torch / lm-eval, and the process-wide patches.

A seam is a place where our code relies on more than a dependency's public,
documented API: a module attribute we replace (``patch``), a private name we
call or read (``private``), a method we override and extend with ``super()``
(``override``), a method we override by re-implementing it without calling
torchtitan's (``reimplemented``), or attributes torchtitan's ``__init__``
sets that we read or change (``attributes``). ``SEAMS`` lists them all;
``seam_problems()`` checks each against the installed packages, and
``tests/test_seams.py`` fails with that list when a torchtitan or torch
upgrade renames, removes or changes one; ``call_site_problems()`` checks that
every keyword our code passes to a seam is among the ``params`` checked (a
renamed keyword would otherwise fail at run time only). For a re-implemented method the
check pins a hash of torchtitan's source: when it changes, compare the new
torchtitan method with ours (named in ``used_in``), port what matters, and
update the hash.

The registry has two lists: ``SEAMS`` (above) and ``DEVICE_SEAMS``, every place
whose behaviour differs between CPU and CUDA; ``seam_problems()`` checks both.

The two process-wide patches are applied here and nowhere else:
:func:`select_device` (run by ``import swallow_titan``, before torchtitan
loads) and :func:`use_cpu_profiler_in_stock_trainer` (stock torchtitan runs
on CPU in ``benchmarks/``; swallow-titan's own Trainer picks its profiler
itself and needs no patch). The CPU shims they install live in
:mod:`swallow_titan.runtime.device` and :mod:`swallow_titan.components.profiling`.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch._utils

SeamKind = Literal["patch", "private", "override", "reimplemented", "attributes"]

_TRAINER = "torchtitan.train.Trainer"
_CHECKPOINTER = "torchtitan.components.checkpoint.CheckpointManager"
_CONFIG_MANAGER = "torchtitan.config.ConfigManager"
_VALIDATOR = "torchtitan.components.validate.Validator"
_METRICS = "torchtitan.components.metrics.MetricsProcessor"


@dataclass(frozen=True)
class Seam:
    """One place where we rely on more than a dependency's public API."""

    target: str
    """Dotted path of the torch / torchtitan object: ``module.Class.method``."""
    kind: SeamKind
    used_in: str
    """Our module (and function) that relies on it."""
    why: str
    params: tuple[str, ...] | None = None
    """The parameter names we rely on (a callable), checked when given: the
    signature starts with them, in this order. Every keyword our code passes
    to ``target`` must be among them (see :func:`call_site_problems`)."""
    source_sha256: str | None = None
    """First 16 hex digits of sha256(inspect.getsource(target)), for "reimplemented"."""
    attributes: tuple[str, ...] = field(default=())
    """For "attributes": names ``target`` (an ``__init__``) must assign on ``self``."""


SEAMS: tuple[Seam, ...] = (
    # ------------------------------------------------------------ device (CPU)
    Seam(
        "torch._utils._get_available_device_type",
        "patch",
        "swallow_titan.runtime.seams.select_device",
        "torchtitan picks its device at import as this() or 'cuda'; on a CPU-only "
        "machine it must answer 'cpu' (patched before torchtitan loads).",
        params=(),
    ),
    Seam(
        "torchtitan.tools.utils.device_module",
        "patch",
        "swallow_titan.runtime.seams.select_device",
        "On CPU replaced by device.CpuDeviceModule: torch.cpu plus the torch.cuda "
        "memory calls torchtitan's metrics make (get_device_name, "
        "get_device_properties, reset_peak_memory_stats, empty_cache, memory_stats, "
        "max_memory_allocated, current_device); torchtitan.distributed.utils and "
        "components.metrics copy it by name at import, after the patch.",
    ),
    Seam(
        "torch.histc",
        "patch",
        "swallow_titan.runtime.seams.select_device",
        "On CPU wrapped by device.integer_histc_on_cpu: torchtitan's MoE router and "
        "reorderer (torchtitan.models.moe.moe) histogram int64 expert indices, which "
        "only CUDA's histc takes.",
    ),
    Seam(
        "torchtitan.models.moe.utils.generate_permute_indices",
        "patch",
        "swallow_titan.runtime.seams.use_cpu_expert_permutation",
        "Expert parallelism on CPU: torchtitan's _permute calls it without use_cpu "
        "(a Triton GPU kernel); it is replaced by itself with use_cpu=True.",
        params=(
            "tokens_per_expert_group",
            "experts_per_rank",
            "num_ranks",
            "max_len",
            "alignment",
            "use_cpu",
        ),
    ),
    # ------------------------------------------------------------ Qwen3 / MoE
    Seam(
        "torch.distributed.tensor.experimental.register_sharding",
        "private",
        "swallow_titan.runtime.seams.use_cpu_attention_sharding",
        "Experimental DTensor API (in torch since 2.5 with this call; used on CPU "
        "only): registers our rule for the CPU flash-attention ops below, which "
        "torch has no rule for, so Qwen3 tensor parallelism runs on CPU.",
        params=("op",),
    ),
    Seam(
        "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default",
        "private",
        "swallow_titan.runtime.device.cpu_flash_attention_shardings",
        "SDPA's CPU kernel, which DTensor SDPA reaches on CPU; our rule reads its "
        "arguments by these names and its outputs as (output, logsumexp), all "
        "[batch, heads, ...].",
        params=("query", "key", "value", "dropout_p", "is_causal", "attn_mask", "scale"),
    ),
    Seam(
        "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default",
        "private",
        "swallow_titan.runtime.device.cpu_flash_attention_backward_shardings",
        "Its backward, read the same way; it returns (grad_query, grad_key, grad_value).",
        params=("grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p",
                "is_causal", "attn_mask", "scale"),
    ),
    Seam(
        "torchtitan.models.qwen3.model.model.Attention.forward",
        "private",
        "swallow_titan.model.parallelize.replicate_positions_over_tp",
        "Our pre-hook replaces the 4th positional argument, positions, which "
        "torchtitan's TP plan leaves a plain tensor beside a DTensor RoPE cache.",
        params=("self", "x", "rope_cache", "attention_masks", "positions"),
    ),
    Seam(
        "torchtitan.models.qwen3.get_train_spec",
        "private",
        "swallow_titan.model.family.QWEN3",
        "Upstream PR #3666: 0.2.2's qwen3 spec builds plain optimizers, so the MoE "
        "expert-bias hook is never registered; our Qwen3 family uses "
        "build_optimizers_with_moe_load_balancing. Pinned: when upstream's spec "
        "changes, check whether the fix landed and drop ours.",
        source_sha256="a15b16299b24cd61",
    ),
    Seam(
        "torchtitan.distributed.NoParallel._prepare_output_fn",
        "private",
        "swallow_titan.model.parallelize.sum_router_gradients_over_tp",
        "Upstream issue #2387 / PR #2416: the router gate's output is made local "
        "without Partial grad placements, so its TP gradient is never summed; our "
        "hook sums it. Pinned: when this changes, check (tests/qwen3_tp_checks.py "
        "says so) whether the fix landed and drop ours.",
        source_sha256="2a50c745a0baa6a3",
    ),
    Seam(
        "torchtitan.models.moe.moe.MoE.forward",
        "private",
        "swallow_titan.components.moe_metrics.ExpertLoadMeter, "
        "swallow_titan.model.qwen3.SwallowQwen3Model",
        "We read MoE.tokens_per_expert / load_balance_coeff / expert_bias and hook "
        "router.gate's output (the logits, for the auxiliary loss) as this forward "
        "uses them. Pinned: re-check those names and that the gate's output is "
        "still the raw logits when it changes.",
        source_sha256="cd182b383f69db58",
    ),
    Seam(
        "torchtitan.tools.utils.device_type",
        "private",
        "swallow_titan.runtime.seams.select_device",
        "Read to detect that torchtitan was imported before swallow_titan on a "
        "CPU-only machine (its device choice is then final).",
    ),
    # --------------------------------------------------------------- profiling
    Seam(
        "torchtitan.train.maybe_enable_profiling",
        "patch",
        "swallow_titan.runtime.seams.use_cpu_profiler_in_stock_trainer",
        "torchtitan's profiler passes activities=[CPU, None] without a GPU, which "
        "torch rejects; stock-torchtitan CPU runs (benchmarks/) get "
        "profiling.maybe_enable_profiling instead.",
        params=("profiling_config", "global_step", "base_folder", "leaf_folder"),
    ),
    Seam(
        "torchtitan.tools.profiling.maybe_enable_profiling",
        "private",
        "swallow_titan.components.profiling.profiling_context",
        "torchtitan's profiler, used when a GPU is present.",
        params=("profiling_config", "global_step", "base_folder", "leaf_folder"),
    ),
    Seam(
        "torchtitan.tools.profiling.maybe_enable_memory_snapshot",
        "private",
        "swallow_titan.trainer.SwallowTrainer.train",
        "Called the way torchtitan's Trainer.train calls it.",
        params=("profiling_config", "global_step", "base_folder"),
    ),
    # ------------------------------------------------------------------ Trainer
    Seam(
        f"{_TRAINER}.__init__",
        "override",
        "swallow_titan.trainer.SwallowTrainer.__init__",
        "Builds the guard before, swaps in the atomic CheckpointManager after.",
        params=("self", "job_config"),
    ),
    Seam(
        f"{_TRAINER}.__init__",
        "attributes",
        "swallow_titan.trainer.SwallowTrainer",
        "train_step / train re-implemented on torchtitan's state.",
        attributes=(
            "gradient_accumulation_steps",
            "ntokens_seen",
            "gc_handler",
            "checkpointer",
            "metrics_processor",
            "validator",
            "step",
            "train_context",
            "maybe_enable_amp",
        ),
    ),
    Seam(
        f"{_TRAINER}.train_step",
        "reimplemented",
        "swallow_titan.trainer.SwallowTrainer.train_step",
        "The numerical guard and the stop flag decide, in one all-reduce, whether "
        "the optimizer steps; logging adds z-loss, skipped steps and data metrics.",
        params=("self", "data_iterator"),
        source_sha256="471795acb90bf1df",
    ),
    Seam(
        f"{_TRAINER}.train",
        "reimplemented",
        "swallow_titan.trainer.SwallowTrainer.train",
        "Stops (with a checkpoint) on SIGTERM, refuses non-finite checkpoints, opens "
        "TensorBoard at the attempt's first step, shortens timeouts on every attempt.",
        params=("self",),
        source_sha256="6d9a39ca1238efbb",
    ),
    Seam(
        f"{_TRAINER}.close",
        "override",
        "swallow_titan.trainer.SwallowTrainer.close",
        "Restores the signal handlers first.",
        params=("self",),
    ),
    Seam(
        f"{_TRAINER}.forward_backward_step",
        "private",
        "swallow_titan.trainer.SwallowTrainer.train_step",
        "Called per micro-batch with torchtitan's keyword arguments.",
        params=("self", "input_dict", "labels", "global_valid_tokens"),
    ),
    Seam(
        f"{_TRAINER}.post_dataloading_process",
        "private",
        "swallow_titan.trainer.SwallowTrainer._domain_losses",
        "A spike event's per-domain losses run the model's forward the way "
        "forward_backward_step does (inputs, extra inputs, attention masks).",
        params=("self", "input_dict", "labels"),
    ),
    Seam(
        f"{_TRAINER}.batch_generator",
        "private",
        "swallow_titan.trainer.SwallowTrainer.train",
        "The data iterator train_step reads (times data loading).",
        params=("self", "data_iterable"),
    ),
    Seam(
        f"{_TRAINER}.should_continue_training",
        "private",
        "swallow_titan.trainer.SwallowTrainer.train",
        "The loop condition of torchtitan's train.",
        params=("self",),
    ),
    Seam(
        "torchtitan.distributed.utils.clip_grad_norm_",
        "private",
        "swallow_titan.trainer.SwallowTrainer.train_step",
        "Gradient clipping across FSDP/TP/PP as torchtitan's train_step does it.",
        params=(
            "parameters",
            "max_norm",
            "norm_type",
            "error_if_nonfinite",
            "foreach",
            "pp_mesh",
            "ep_enabled",
        ),
    ),
    Seam(
        "torchtitan.distributed.utils.set_pg_timeouts",
        "private",
        "swallow_titan.trainer.SwallowTrainer.train",
        "Shortens the process-group timeouts after the first step.",
        params=("timeout", "parallel_dims"),
    ),
    # -------------------------------------------------------- CheckpointManager
    Seam(
        f"{_CHECKPOINTER}.__init__",
        "override",
        "swallow_titan.checkpoint.manager.AtomicCheckpointManager.__init__",
        "Adds the optional entries and the publish delay; torchtitan's arguments "
        "are passed through (the trainer rebuilds the manager with them).",
        params=("self", "dataloader", "model_parts", "optimizers", "lr_schedulers",
                "states", "checkpoint_config", "sd_adapter", "base_folder"),
    ),
    Seam(
        f"{_CHECKPOINTER}.__init__",
        "attributes",
        "swallow_titan.checkpoint.manager / swallow_titan.components.start_rule",
        "The manager publishes into `folder`, prunes through `purge_queue` / "
        "`purge_thread` with `keep_latest_k`, waits on `save_future`; the start "
        "rule clears `initial_load_path` / `initial_load_in_hf` after loading "
        "the start weights itself.",
        attributes=(
            "enable",
            "load_only",
            "folder",
            "keep_latest_k",
            "purge_queue",
            "purge_thread",
            "save_future",
            "initial_load_path",
            "initial_load_in_hf",
            "sd_adapter",
        ),
    ),
    Seam(
        f"{_CHECKPOINTER}.dcp_save",
        "override",
        "swallow_titan.checkpoint.manager.AtomicCheckpointManager.dcp_save",
        "Writes under a staging name, then publishes step-N atomically.",
        params=("self", "state_dict", "checkpoint_id", "async_mode",
                "enable_garbage_collection", "to_hf"),
    ),
    Seam(
        f"{_CHECKPOINTER}.dcp_load",
        "override",
        "swallow_titan.checkpoint.manager.AtomicCheckpointManager.dcp_load",
        "Optional entries (RNG, guard) load only when the checkpoint holds them.",
        params=("self", "state_dict", "checkpoint_id", "from_hf", "from_quantized"),
    ),
    Seam(
        f"{_CHECKPOINTER}.load",
        "override",
        "swallow_titan.checkpoint.manager.AtomicCheckpointManager.load",
        "Cleans leftovers and checks the step before torchtitan loads it.",
        params=("self", "step"),
    ),
    Seam(
        f"{_CHECKPOINTER}.close",
        "override",
        "swallow_titan.checkpoint.manager.AtomicCheckpointManager.close",
        "Waits for an async save in flight.",
        params=("self",),
    ),
    Seam(
        f"{_CHECKPOINTER}._find_load_step",
        "override",
        "swallow_titan.checkpoint.manager.AtomicCheckpointManager._find_load_step",
        "Resume takes the newest checkpoint that passes the integrity checks.",
        params=("self", "folder"),
    ),
    Seam(
        f"{_CHECKPOINTER}._purge_stale_checkpoints",
        "reimplemented",
        "swallow_titan.checkpoint.manager.AtomicCheckpointManager._purge_stale_checkpoints",
        "keep_latest_k never deletes the checkpoint resumed from or one still "
        "being written, and counts only complete ones.",
        params=("self",),
        source_sha256="aafb0ce307fab240",
    ),
    Seam(
        f"{_CHECKPOINTER}._async_wait",
        "private",
        "swallow_titan.checkpoint.manager.AtomicCheckpointManager",
        "save_now / newest_step / close wait for an async save in flight.",
        params=("self",),
    ),
    Seam(
        f"{_CHECKPOINTER}._flattened_model_states_sd",
        "private",
        "swallow_titan.checkpoint.manager.AtomicCheckpointManager.save_now",
        "The state dict torchtitan's save writes.",
        params=("self", "state_dict"),
    ),
    Seam(
        f"{_CHECKPOINTER}._should_save",
        "private",
        "swallow_titan.checkpoint.manager.AtomicCheckpointManager.will_save",
        "Whether save() writes at a step (interval, last step).",
        params=("self", "curr_step", "last_step"),
    ),
    Seam(
        f"{_CHECKPOINTER}._create_checkpoint_id",
        "private",
        "swallow_titan.checkpoint.manager.AtomicCheckpointManager",
        "The step-N folder of a step.",
        params=("self", "step", "folder"),
    ),
    Seam(
        f"{_CHECKPOINTER}.maybe_wait_for_staging",
        "private",
        "swallow_titan.trainer.SwallowTrainer.train_step",
        "An async save must finish staging before the optimizer changes weights.",
        params=("self",),
    ),
    # ------------------------------------------------------------ ConfigManager
    Seam(
        f"{_CONFIG_MANAGER}._merge_configs",
        "private",
        "swallow_titan.config.manager.merged_job_config_class",
        "Merges our sections into torchtitan's JobConfig as custom_config_module does.",
        params=("base", "custom"),
    ),
    Seam(
        f"{_CONFIG_MANAGER}._maybe_load_toml",
        "reimplemented",
        "swallow_titan.config.manager.SwallowConfigManager._maybe_load_toml",
        "A missing or unparsable TOML file is a ConfigError naming the file.",
        params=("self", "args"),
        source_sha256="c2c9522bfaee1780",
    ),
    Seam(
        f"{_CONFIG_MANAGER}._dict_to_dataclass",
        "reimplemented",
        "swallow_titan.config.manager.SwallowConfigManager._dict_to_dataclass",
        "Every TOML key is checked (unknown keys, types, literals) with file and key.",
        params=("self", "cls", "data"),
        source_sha256="3e965afdcba0117f",
    ),
    Seam(
        f"{_CONFIG_MANAGER}.__init__",
        "override",
        "swallow_titan.config.manager.SwallowConfigManager.__init__",
        "Always parses into the JobConfig merged with our sections.",
        params=("self", "config_cls"),
    ),
    Seam(
        f"{_CONFIG_MANAGER}.parse_args",
        "override",
        "swallow_titan.config.manager.SwallowConfigManager.parse_args",
        "Accepts `--flag true|false` before torchtitan parses.",
        params=("self", "args"),
    ),
    # ---------------------------------------------------------------- Validator
    Seam(
        "torchtitan.components.validate.build_text_validation_dataloader",
        "patch",
        "swallow_titan.components.validation._validator_reads",
        "Validator.__init__ always builds torchtitan's text dataloader through this "
        "module-level name; while one set's Validator is constructed it returns that "
        "set's HeldOutLoader (keyword call: job_config, dp_world_size, dp_rank, "
        "tokenizer, infinite).",
        params=("dp_world_size", "dp_rank", "tokenizer", "job_config", "infinite"),
    ),
    Seam(
        f"{_VALIDATOR}.__init__",
        "attributes",
        "swallow_titan.components.validation.PerDomainValidator",
        "Built through its constructor with the set's loader and loss recorder: "
        "these must be what validate() reads.",
        attributes=("validation_dataloader", "metrics_processor", "loss_fn"),
    ),
    Seam(
        f"{_VALIDATOR}.validate",
        "private",
        "swallow_titan.components.validation.PerDomainValidator.validate",
        "Run once per set: it iterates self.validation_dataloader and reports the "
        "set's loss through metrics_processor.log_validation exactly once.",
        params=("self", "model_parts", "step"),
        source_sha256="3c8d2dd9470e7e65",
    ),
    # --------------------------------------------------------- MetricsProcessor
    Seam(
        f"{_METRICS}.__init__",
        "override",
        "swallow_titan.components.metrics.SwallowMetricsProcessor.__init__",
        "Built with TensorBoard off (ours replaces it); reads device_memory_monitor, "
        "ntokens_since_last_log, data_loading_times, time_last_log, "
        "num_flops_per_token, logger.",
        params=("self", "job_config", "parallel_dims", "tag"),
    ),
    Seam(
        f"{_METRICS}.__init__",
        "attributes",
        "swallow_titan.components.metrics.SwallowMetricsProcessor.log",
        "The counters log() reads and resets.",
        attributes=(
            "device_memory_monitor",
            "ntokens_since_last_log",
            "data_loading_times",
            "time_last_log",
            "logger",
        ),
    ),
    Seam(
        f"{_METRICS}.log",
        "reimplemented",
        "swallow_titan.components.metrics.SwallowMetricsProcessor.log",
        "Our scalars, TensorBoard writer and progress line with ETA.",
        params=("self", "step", "global_avg_loss", "global_max_loss", "grad_norm",
                "extra_metrics"),
        source_sha256="3c99cf39c0a796ce",
    ),
    Seam(
        f"{_METRICS}.log_validation",
        "reimplemented",
        "swallow_titan.components.metrics.SwallowMetricsProcessor.log_validation",
        "A single validation loss is logged as one set.",
        params=("self", "loss", "step", "extra_metrics"),
        source_sha256="803a61e555750782",
    ),
    Seam(
        f"{_METRICS}.close",
        "override",
        "swallow_titan.components.metrics.SwallowMetricsProcessor.close",
        "Closes our TensorBoard writer.",
        params=("self",),
    ),
    # ----------------------------------------------------------------- TrainSpec
    Seam(
        "torchtitan.protocols.train_spec._extra_train_specs",
        "private",
        "swallow_titan.train_spec, benchmarks/stock_torchtitan.py, "
        "swallow_titan.simulate._register_simulated_spec",
        "Registering twice raises; importing train_spec again must not (and the "
        "simulation re-registers its spec in each run of a process).",
    ),
    # ------------------------------------------------------------- torch (kernels)
    Seam(
        "torch.distributed.distributed_c10d._resolve_process_group",
        "private",
        "kernels.cross_entropy, swallow_titan.simulate._group_ranks",
        "The fused loss's custom op gets a process group by name (ops take no "
        "groups); the simulation maps a functional collective's group name to its "
        "ranks. A C++ builtin, so only its presence is checked.",
    ),
    Seam(
        "torch.distributed.tensor._utils.compute_local_shape_and_global_offset",
        "private",
        "kernels.cross_entropy",
        "This rank's vocabulary slice of a TP-sharded output weight.",
        params=("global_shape", "mesh", "placements"),
    ),
    Seam(
        "torch.distributed.fsdp.FSDPModule.set_force_sum_reduction_for_comms",
        "private",
        "swallow_titan.model.parallelize.force_sum_reduction",
        "gloo lacks PREMUL_SUM; with a divide factor of 1 SUM is the same arithmetic.",
        params=("self", "enable"),
    ),
    # --------------------------------------------------------- torch (simulate)
    Seam(
        "torch.distributed.tensor._sharding_prop.detect_fake_mode",
        "patch",
        "swallow_titan.runtime.seams.dtensor_propagation_in_own_fake_mode",
        "DTensor's sharding propagation runs each new op once on global-shape fake "
        "tensors in the active fake mode; under the simulation's fake mode those "
        "look like real allocations to the memory tracker (the 16 bytes/param "
        "fused-AdamW 'peak'). While simulating, it gets a fake mode of its own.",
        params=("inputs",),
    ),
    Seam(
        "torch.distributed.tensor._sharding_prop.ShardingPropagator._propagate_tensor_meta_non_cached",
        "private",
        "swallow_titan.runtime.seams.dtensor_propagation_in_own_fake_mode",
        "The propagation step that calls detect_fake_mode() (checked by "
        "tests/test_simulate.py::test_optimizer_peak_is_propagation_not_materialisation).",
        params=("self", "op_schema"),
    ),
    Seam(
        "torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker",
        "private",
        "swallow_titan.simulate",
        "Per-rank memory by kind under fake tensors (torch's private tools package).",
        params=("mod", "optm"),
    ),
    Seam(
        "torch.distributed._tools.mem_tracker.MemTracker.__init__",
        "attributes",
        "swallow_titan.simulate._largest_modules",
        "Per-module peaks (each entry's mod_fqn and local_peak) for the largest modules.",
        attributes=("memory_tracking",),
    ),
    Seam(
        "torch._subclasses.fake_tensor.unset_fake_temporarily",
        "private",
        "swallow_titan.simulate.SimulatedTrainer.init_distributed, kernels.cross_entropy",
        "Device meshes are built from real tensors (rank coordinates), outside the fake "
        "mode; the fused loss's vocabulary offset likewise.",
        params=(),
    ),
    Seam(
        "torch._subclasses.fake_tensor.FakeTensor",
        "private",
        "swallow_titan.simulate.KnownExpertCounts",
        "Which op inputs are fake (no value): an op that mixes a known MoE token count "
        "with a fake tensor gets no known value.",
    ),
    Seam(
        "torch.utils._python_dispatch._disable_current_modes",
        "private",
        "swallow_titan.runtime.seams.disable_dispatch_modes",
        "The simulation computes the known values of MoE token counts outside every "
        "dispatch mode (fake tensors, memory tracker, collective recorder), so that "
        "they are neither fake nor counted as the rank's memory.",
        params=(),
    ),
    Seam(
        "torchtitan.models.moe.moe.TokenChoiceTopKRouter._debug_force_load_balance_routing",
        "private",
        "swallow_titan.simulate.balanced_counts",
        "The simulation's MoE routing assumption: debug.moe_force_load_balance makes "
        "the router call this, which routes token slot i to expert i mod E (exactly "
        "balanced), in fake and real runs alike; simulate.balanced_counts gives fake "
        "tensors the same counts. The pinned source hash tells when that routing may "
        "have changed.",
        params=("self", "scores"),
        source_sha256="60950dcacc1d55ff",
    ),
    Seam(
        "torch.testing._internal.distributed.fake_pg.FakeStore",
        "private",
        "swallow_titan.simulate.simulate",
        "The store the fake process group is initialised with (any rank, any size).",
    ),
    # ------------------------------------------------------ GPU smoke (benchmarks)
    Seam(
        "torchtitan.distributed.utils.set_determinism",
        "private",
        "benchmarks.gpu_e2e.recipe_path",
        "With debug.deterministic, torchtitan recompiles FlexAttention without "
        "max-autotune; the GPU smoke turns it on (warnings only) so that cold "
        "compilation fits its time budget. The pinned source hash tells when that "
        "behaviour may have changed.",
        params=("parallel_dims", "device", "debug_config", "distinct_seed_mesh_dims"),
        source_sha256="0d4253aca27f0ae4",
    ),
    Seam(
        "torchtitan.models.attention.FlexAttentionWrapper._compiled_flex_attn",
        "private",
        "tests/test_gpu_run.py",
        "The compiled flex_attention whose compiler options show max-autotune on or off.",
    ),
    # ------------------------------------------------- lm-eval (the [eval] extra)
    Seam(
        "lm_eval.tasks._yaml_loader.load_yaml",
        "private",
        "swallow_titan.eval.tasks.unreadable_yaml",
        "lm-eval's task index skips a YAML file it cannot parse without a word; "
        "parsing each file with lm-eval's own loader (its !function tags) names it.",
        params=("path", "resolve_func"),
    ),
    Seam(
        "lm_eval.tasks._index.Entry",
        "private",
        "swallow_titan.eval.tasks._all_own",
        "Which task index a task list needs: a local group's members are read from its "
        "index entry's parsed YAML (cfg), before anything is built.",
        params=("name", "kind", "yaml_path", "cfg"),
    ),
)


# ------------------------------------------------------------ device seams
# Every place where swallow-titan's training code (swallow_titan/, kernels/)
# behaves differently on CPU and on a CUDA GPU, in one list. Benchmarks
# (benchmarks/) choose their device themselves and are not listed.
# seam_problems() checks that each listed file defines the names given;
# tests/test_device_seams.py checks that every source file with such a branch
# appears here, and that a process where torch reports CUDA gets none of the
# CPU shims.


@dataclass(frozen=True)
class DeviceSeam:
    """One device-dependent behaviour: where it lives, what CPU and CUDA get."""

    where: str  # "path/to/module.py: function or class"
    cpu: str
    cuda: str
    shim: bool  # installs a CPU replacement for something torch or torchtitan provides


DEVICE_SEAMS: tuple[DeviceSeam, ...] = (
    DeviceSeam(
        "swallow_titan/runtime/seams.py: select_device",
        "replaces torch._utils._get_available_device_type (reports 'cpu') before "
        "torchtitan is imported, so torchtitan's device_type is 'cpu', and installs "
        "CpuDeviceModule and integer_histc_on_cpu",
        "nothing replaced: torchtitan's device_type is 'cuda'",
        shim=True,
    ),
    DeviceSeam(
        "swallow_titan/runtime/device.py: CpuDeviceModule",
        "torchtitan.tools.utils.device_module becomes torch.cpu plus memory and "
        "device-name calls (peak RSS as memory)",
        "torchtitan's device_module stays torch.cuda",
        shim=True,
    ),
    DeviceSeam(
        "swallow_titan/runtime/device.py: integer_histc_on_cpu",
        "torch.histc takes integer tensors (cast to float; MoE expert counts)",
        "torch.histc unchanged (CUDA histograms take integers)",
        shim=True,
    ),
    DeviceSeam(
        "swallow_titan/model/parallelize.py: parallelize_swallow_qwen3",
        "expert parallelism permutes tokens with torchtitan's CPU index fill "
        "(seams.use_cpu_expert_permutation); tensor parallelism registers a DTensor "
        "sharding rule for the CPU flash-attention kernel (seams.use_cpu_attention_sharding, "
        "rules in device.cpu_flash_attention_shardings)",
        "torchtitan's Triton index-fill kernel; torch's own DTensor rules for the CUDA "
        "attention kernels",
        shim=True,
    ),
    DeviceSeam(
        "swallow_titan/model/qwen3.py: SwallowQwen3ModelArgs",
        "MoE experts run torchtitan's per-expert loop in the model dtype",
        "torch._grouped_mm in bf16 unless [moe] grouped_mm = false",
        shim=False,
    ),
    DeviceSeam(
        "swallow_titan/runtime/device.py: default_ngpu",
        "1 process per node",
        "one process per visible GPU",
        shim=False,
    ),
    DeviceSeam(
        "swallow_titan/components/profiling.py: profiling_context, available_activities",
        "swallow-titan's trainer profiles with this module's CPU-activities profiler",
        "torchtitan's profiler (CPU + CUDA activities)",
        shim=True,
    ),
    DeviceSeam(
        "swallow_titan/runtime/seams.py: use_cpu_profiler_in_stock_trainer",
        "stock torchtitan's Trainer (benchmarks/) gets the CPU profiler",
        "torchtitan.train.maybe_enable_profiling left as it is",
        shim=True,
    ),
    DeviceSeam(
        "swallow_titan/model/parallelize.py: parallelize_swallow",
        "on gloo (CPU) FSDP2 reduces with SUM instead of PREMUL_SUM(1.0)",
        "NCCL: torchtitan's FSDP2 reduction unchanged",
        shim=False,
    ),
    DeviceSeam(
        "swallow_titan/components/metrics.py: SwallowMetricsProcessor",
        "no MFU (no peak), memory is peak RSS",
        "MFU against the card's dense bf16 peak",
        shim=False,
    ),
    DeviceSeam(
        "swallow_titan/checkpoint/rng.py: RngState",
        "CPU generator only",
        "CPU and CUDA generators saved and restored",
        shim=False,
    ),
    DeviceSeam(
        "swallow_titan/components/preflight.py: _check_checkpoint_device, _check_float8, "
        "_check_kernels_device",
        "refuses pinned-memory async checkpoints, float8 without emulate (or emulated "
        "with a compiled model), Triton kernels without TRITON_INTERPRET=1",
        "no device restriction",
        shim=False,
    ),
    DeviceSeam(
        "swallow_titan/simulate.py: SimulatedTrainer, apply_stand_ins",
        "simulates on fake CPU tensors (torch without CUDA cannot run backward on "
        "fake CUDA tensors); SDPA on the CPU flash kernel stands in for FlexAttention, "
        "float8 is emulated; the trainer's 'cpu:<rank>' device becomes 'cpu'",
        "simulates on fake CUDA tensors (the GPU's kernels' shapes); the same "
        "attention and float8 stand-ins",
        shim=False,
    ),
    DeviceSeam(
        "swallow_titan/evaluate.py: _init_distributed, main",
        "evaluates on CPU with gloo, in float32 unless --dtype says otherwise",
        "one GPU per process (LOCAL_RANK) with NCCL, bfloat16 by default",
        shim=False,
    ),
    DeviceSeam(
        "kernels/runtime.py: check_device, autotune_configs, num_programs",
        "kernels run only under Triton's interpreter, one autotune config, 4 programs",
        "compiled Triton, the GPU autotune lists, programs per SM",
        shim=False,
    ),
    DeviceSeam(
        "kernels/cross_entropy.py: out_dtype_gemm_available, _gemm_dtype",
        "no out_dtype GEMMs: logits rounded to the GEMM dtype, weight-gradient GEMM "
        "in fp32 on upcast operands; autocast dtype read for 'cpu'",
        "bf16 GEMMs with fp32 output (probed once); autocast dtype read for 'cuda'",
        shim=False,
    ),
)


def resolve(target: str) -> Any:
    """The object a dotted path names: the longest importable module, then attributes."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = inspect.getattr_static(obj, name)
            if isinstance(obj, (staticmethod, classmethod)):
                obj = obj.__func__
        return obj
    raise ImportError(f"no module in {target!r}")


def source_hash(obj: Any) -> str:
    """First 16 hex digits of the sha256 of ``obj``'s source."""
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def _assigned_attributes(init: Any) -> set[str]:
    return set(re.findall(r"\bself\.(\w+)\s*(?::[^=\n]+)?=(?!=)", inspect.getsource(init)))


def device_seam_problems(device_seams: tuple[DeviceSeam, ...]) -> list[str]:
    """Device seams whose file is gone or no longer defines a name they list."""
    root = Path(__file__).resolve().parents[2]
    problems = []
    for seam in device_seams:
        path, _, names = seam.where.partition(":")
        file = root / path.strip()
        if not file.is_file():
            problems.append(f"{seam.where}: no file {path.strip()}")
            continue
        code = file.read_text(encoding="utf-8")
        for name in (n.strip() for n in names.split(",")):
            if not re.search(rf"^\s*(?:def|class)\s+{re.escape(name)}\b", code, re.MULTILINE):
                problems.append(f"{seam.where}: {path.strip()} no longer defines {name}")
    return problems


def _parameter_names(obj: Any) -> tuple[str, ...]:
    """A callable's parameter names; for a torch operator, its schema's arguments."""
    if isinstance(obj, torch._ops.OpOverload):
        return tuple(argument.name for argument in obj._schema.arguments)
    return tuple(inspect.signature(obj).parameters)


def seam_problems(
    seams: tuple[Seam, ...] = SEAMS, device_seams: tuple[DeviceSeam, ...] = DEVICE_SEAMS
) -> list[str]:
    """What no longer matches in the installed torch / torchtitan / lm-eval, and device
    seams that no longer name our code, one line per problem."""
    problems = device_seam_problems(device_seams)
    for seam in seams:
        where = f"{seam.target} ({seam.kind}, used in {seam.used_in})"
        try:
            obj = resolve(seam.target)
        except (ImportError, AttributeError) as e:
            problems.append(f"{where}: not found ({e})")
            continue
        if seam.params is not None:
            try:
                params = _parameter_names(obj)
            except (TypeError, ValueError) as e:
                problems.append(f"{where}: no signature ({e})")
                continue
            if params[: len(seam.params)] != seam.params:
                problems.append(f"{where}: parameters are {params}, expected {seam.params}")
        if seam.source_sha256 is not None:
            found = source_hash(obj)
            if found != seam.source_sha256:
                problems.append(
                    f"{where}: torchtitan's source changed (sha256 {found}, pinned "
                    f"{seam.source_sha256}); compare it with {seam.used_in}, port what "
                    "matters, then update the hash"
                )
        missing = sorted(set(seam.attributes) - _assigned_attributes(obj)) if seam.attributes else []
        if missing:
            problems.append(f"{where}: no longer sets self.{', self.'.join(missing)}")
    return problems


def _used_in_modules(used_in: str) -> list[str]:
    """Source files of the modules a ``used_in`` names (``a.b.func / c.d``)."""
    files = []
    for name in re.findall(r"[A-Za-z_][\w.]*", used_in):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                spec = importlib.util.find_spec(".".join(parts[:cut]))
            except (ImportError, ValueError):
                spec = None
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                files.append(spec.origin)
                break
    return files


def passed_keywords(seam: Seam) -> dict[str, set[str]]:
    """The keywords our code passes to ``seam.target``, by ``file:line``.

    Calls are found by name in the modules ``seam.used_in`` names: a function
    as ``f(...)`` or ``module.f(...)``, a method as ``self.f(...)``,
    ``super().f(...)`` or ``Class.f(...)``; ``**kwargs`` cannot be seen.
    """
    owner, name = seam.target.rsplit(".", 1)
    try:
        # A method is called on self, super() or its class, never on another object.
        receivers = {"self", "super", owner.rsplit(".", 1)[-1]} if inspect.isclass(
            resolve(owner)) else None
    except (ImportError, AttributeError):
        receivers = None
    found: dict[str, set[str]] = {}
    for path in _used_in_modules(seam.used_in):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called != name:
                continue
            if receivers is not None:
                value = func.value if isinstance(func, ast.Attribute) else None
                receiver = value.func if isinstance(value, ast.Call) else value
                if getattr(receiver, "id", None) not in receivers:
                    continue
            keywords = {k.arg for k in node.keywords if k.arg is not None}
            if keywords:
                found[f"{path}:{node.lineno}"] = keywords
    return found


def call_site_problems(seams: tuple[Seam, ...] = SEAMS) -> list[str]:
    """Keywords our code passes to a seam that its entry does not list (so
    :func:`seam_problems` would not notice their rename), one line per call."""
    problems = []
    for seam in seams:
        if seam.kind not in ("private", "override", "patch") or seam.params is None:
            continue
        for where, keywords in passed_keywords(seam).items():
            unlisted = sorted(keywords - set(seam.params))
            if unlisted:
                problems.append(
                    f"{seam.target} ({seam.kind}): {where} passes {', '.join(unlisted)}, "
                    f"which its seam's params {seam.params} do not list"
                )
    return problems


# ------------------------------------------------------------ the patches


def _report_cpu() -> str:
    return "cpu"


def select_device() -> str:
    """Select the device type torchtitan will use and return it.

    Idempotent. Raises if torchtitan was imported earlier on a CPU-only machine,
    because its device choice can no longer be changed then.
    """
    from swallow_titan.runtime.device import (
        CpuDeviceModule,
        gpu_available,
        integer_histc_on_cpu,
    )

    if gpu_available():
        return torch._utils._get_available_device_type()
    if "torchtitan.tools.utils" in sys.modules:
        imported = sys.modules["torchtitan.tools.utils"].device_type
        if imported != "cpu":
            raise RuntimeError(
                "torchtitan was imported before swallow_titan on a machine without "
                f"a GPU, so it picked device type {imported!r}. Import swallow_titan "
                "first."
            )
    torch._utils._get_available_device_type = _report_cpu
    import torchtitan.tools.utils as titan_utils

    # Modules importing `device_module` by name do so later, and get this one.
    if not isinstance(titan_utils.device_module, CpuDeviceModule):
        titan_utils.device_module = CpuDeviceModule()
    if not hasattr(torch.histc, "__wrapped_histc__"):
        torch.histc = integer_histc_on_cpu(torch.histc)
    return "cpu"


@contextlib.contextmanager
def dtensor_propagation_in_own_fake_mode() -> Iterator[None]:
    """While active, DTensor's sharding propagation uses a fake mode of its own.

    DTensor derives an op's output shape by running it once on fake tensors of
    the *global* shape, in ``detect_fake_mode() or FakeTensorMode()``. In a real
    run there is no active fake mode, so that costs nothing; in a simulation the
    active one is the simulation's, and the memory tracker (which skips only ops
    of *other* fake modes) counts those global-shape tensors as this rank's. A
    foreach or fused optimizer op over all parameters then "allocates" every
    parameter, gradient and moment at full size at once: 16 bytes per parameter
    for fused AdamW. Nothing is materialised on a GPU; this patch makes the
    simulation see it that way too.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    import torch.distributed.tensor._sharding_prop as sharding_prop

    original = sharding_prop.detect_fake_mode
    own = FakeTensorMode(allow_non_fake_inputs=True)

    def propagation_mode(inputs: Any = None) -> Any:
        del inputs
        return own

    sharding_prop.detect_fake_mode = propagation_mode
    try:
        yield
    finally:
        sharding_prop.detect_fake_mode = original


@contextlib.contextmanager
def disable_dispatch_modes() -> Iterator[None]:
    """While active, no torch dispatch mode (fake tensors, trackers) sees an op:
    the simulation computes real values of MoE token counts in it."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


def use_cpu_expert_permutation() -> None:
    """Make torchtitan's expert-parallel token permutation run on CPU.

    ``torchtitan.models.moe.utils._permute`` calls ``generate_permute_indices``
    without ``use_cpu``, which launches a Triton GPU kernel; torchtitan ships
    the exact CPU implementation behind ``use_cpu=True``. Called by the Qwen3
    parallelisation when expert parallelism runs without a GPU. Idempotent.
    """
    import torchtitan.models.moe.utils as moe_utils

    current = moe_utils.generate_permute_indices
    if not isinstance(current, functools.partial):
        moe_utils.generate_permute_indices = functools.partial(current, use_cpu=True)


_CPU_ATTENTION_SHARDING_REGISTERED = False


def use_cpu_attention_sharding() -> bool:
    """Give DTensor a sharding rule for torch's CPU flash-attention kernel.

    torchtitan's Qwen3 tensor-parallel plan keeps q, k and v as DTensors
    sharded on the heads and calls SDPA on them; on CPU that dispatches to
    ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward),
    for which torch has no DTensor rule. The rule registered here
    (:func:`swallow_titan.runtime.device.cpu_flash_attention_shardings`) keeps
    every tensor on its heads shard, or all replicated. Called by the Qwen3
    parallelisation when tensor parallelism runs without a GPU (CUDA's kernels
    have torch's own rules). Idempotent; returns whether this call registered it.
    """
    global _CPU_ATTENTION_SHARDING_REGISTERED
    if _CPU_ATTENTION_SHARDING_REGISTERED:
        return False
    from torch.distributed.tensor.experimental import register_sharding

    from swallow_titan.runtime.device import (
        cpu_flash_attention_backward_shardings,
        cpu_flash_attention_shardings,
    )

    aten = torch.ops.aten
    register_sharding(aten._scaled_dot_product_flash_attention_for_cpu.default)(
        cpu_flash_attention_shardings
    )
    register_sharding(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)(
        cpu_flash_attention_backward_shardings
    )
    _CPU_ATTENTION_SHARDING_REGISTERED = True
    return True


def use_cpu_profiler_in_stock_trainer() -> None:
    """Give torchtitan's own Trainer a profiler that works without a GPU."""
    import torchtitan.train

    from swallow_titan.components.profiling import maybe_enable_profiling

    if not torch.cuda.is_available():
        torchtitan.train.maybe_enable_profiling = maybe_enable_profiling
