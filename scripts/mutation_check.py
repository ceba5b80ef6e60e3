"""Plant plausible bugs, one at a time, and check that the fast tests catch each one.

Each mutation below replaces one snippet of the safety- or correctness-critical
code (mixture schedule, slot assignment, lane resume state, checkpoint
integrity and publication, start rule, guard, RMSNorm and fused-loss kernels and
their autograd, HF weight mapping and RoPE settings, the run log; and the
edges of the data path, metrics, validation, pre-emption, export and model
card, in a block of its own; Qwen3's HF mapping, auxiliary loss, CPU
attention rule and preflight) with a
plausible wrong version, in a scratch copy of the repository (never in the
working tree), and runs the tests that should catch it. A mutation whose tests
still pass "survived": the table says so and the script exits 1.

    nice python scripts/mutation_check.py            # all (~15-25 min on 2 cores)
    python scripts/mutation_check.py --only rmsnorm-bwd-dw-overwritten
    python scripts/mutation_check.py --list          # the bugs, checked to apply

Not part of CI (too slow for 2 cores). The README records the last result.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    """One planted bug: ``old`` (exactly once in ``path``) becomes ``new``."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


SCHEDULE = ("tests/test_schedule.py",)
LOADER = ("tests/test_data_loader.py",)
CHECKPOINTS = ("tests/test_checkpoint_safety.py",)
START = ("tests/test_hf_start.py",)
GUARD = ("tests/test_guard.py", "-m", "not slow")
SPIKES = ("tests/test_spikes.py", "-m", "not slow")
RMSNORM = ("tests/test_kernels_rmsnorm.py", "tests/test_kernels_strength.py", "-k", "not kernels_from")
CROSS_ENTROPY = ("tests/test_kernels_cross_entropy.py",)
HF = ("tests/test_hf_config.py", "tests/test_hf_interop.py")

MUTATIONS: tuple[Mutation, ...] = (
    # ------------------------------------------------------------ mixture schedule
    Mutation(
        "schedule-no-eligibility-threshold", "swallow_titan/data/schedule.py",
        "if self._scale * quota < self.total:", "if self._scale * quota < 0:",
        SCHEDULE, "Tijdeman's 1/(2S-2) eligibility threshold dropped",
    ),
    Mutation(
        "schedule-deadline-inverted", "swallow_titan/data/schedule.py",
        "return ds * self.weights[r] < dr * self.weights[s]",
        "return ds * self.weights[r] > dr * self.weights[s]",
        SCHEDULE, "the source due last is chosen instead of the one due first",
    ),
    Mutation(
        "schedule-no-rotation", "swallow_titan/data/schedule.py",
        "shift = (batch * self.stride) % self.slots", "shift = 0",
        SCHEDULE, "slots never rotate: slot 0 always takes the first source",
    ),
    Mutation(
        "schedule-binary-weights", "swallow_titan/data/schedule.py",
        "fractions = [Fraction(repr(float(w))) for w in weights]",
        "fractions = [Fraction(float(w)) for w in weights]",
        SCHEDULE, "weights read as binary floats (1.7 is not 17/10)",
    ),
    Mutation(
        "schedule-stride-not-coprime", "swallow_titan/data/schedule.py",
        "if 0 < candidate < slots and math.gcd(candidate, slots) == 1:",
        "if 0 < candidate < slots:",
        SCHEDULE, "a rotation stride sharing a factor with the slot count",
    ),
    # ------------------------------------------------------------- slot assignment
    Mutation(
        "slots-stand-in-most-ahead", "swallow_titan/data/slots.py",
        "return max(live, key=lambda s: (weights[s] * taken - self.taken[s] * total, -s))",
        "return min(live, key=lambda s: (weights[s] * taken - self.taken[s] * total, -s))",
        LOADER, "a stopped source's positions go to the source furthest ahead",
    ),
    Mutation(
        "slots-scheduled-counts-the-stand-in", "swallow_titan/data/slots.py",
        "self.scheduled[planned] += 1", "self.scheduled[source] += 1",
        LOADER, "the schedule's count follows the stand-in source",
    ),
    Mutation(
        "slots-local-slot-index", "swallow_titan/data/slots.py",
        "window = stream.next_window(slot_sources[stream.slot], after, stage, base)",
        "window = stream.next_window(slot_sources[stream.slot - slots[0]], after, stage, base)",
        LOADER, "a rank indexes the batch's sources by its local slot number",
    ),
    Mutation(
        "slots-resume-ignores-global-batch", "swallow_titan/data/slots.py",
        "if state[\"slots\"] != spec.slots:", "if False:",
        LOADER, "a data state saved at another global batch size is accepted",
    ),
    # ------------------------------------------------------------ lane resume state
    Mutation(
        "lane-emitted-miscounted", "swallow_titan/data/lane.py",
        "state.item, state.emitted = self._pos - 1, self._current_len - pending",
        "state.item, state.emitted = self._pos - 1, pending",
        LOADER, "the saved count of a split document's tokens is its remainder",
    ),
    Mutation(
        "lane-resume-repeats-split-document", "swallow_titan/data/lane.py",
        "self._packer.add(ids, skip=state.emitted)", "self._packer.add(ids)",
        LOADER, "a resume re-packs the tokens already trained on",
    ),
    Mutation(
        "lane-block-cursor-one-late", "swallow_titan/data/lane.py",
        "state.unit, state.record, state.offset = u_pos, record.index, record.offset",
        "state.unit, state.record, state.offset = u_pos, record.index + 1, -1",
        LOADER, "the block cursor points one record past the block's first",
    ),
    Mutation(
        "lane-same-shuffle-every-epoch", "swallow_titan/data/lane.py",
        "                self.state.epoch, self.state.block,\n",
        "                self.state.block,\n",
        LOADER, "documents are permuted the same way in every epoch",
    ),
    # (`state.epoch >= limit` -> `>` in _end_epoch is equivalent: the fractional
    # check in _check_epoch_limit also stops an integer limit at the epoch's start.)
    Mutation(
        "lane-fractional-max-epochs-ignored", "swallow_titan/data/lane.py",
        "state.epoch != math.floor(limit)", "state.epoch != math.ceil(limit)",
        LOADER, "max_epochs = 1.5 reads two whole epochs",
    ),
    # -------------------------------------------- checkpoint integrity, publication
    Mutation(
        "integrity-unreadable-metadata-accepted", "swallow_titan/checkpoint/integrity.py",
        'return [f"{DCP_METADATA} is unreadable ({type(e).__name__}: {e})"]', "return []",
        CHECKPOINTS, "a checkpoint whose .metadata cannot be read has no problems",
    ),
    Mutation(
        "integrity-empty-step-folder-accepted", "swallow_titan/checkpoint/integrity.py",
        'problems.append(f"it has neither {DCP_METADATA} nor {HF_INDEX}")', "pass",
        CHECKPOINTS, "a step folder with neither .metadata nor an HF index is accepted",
    ),
    Mutation(
        "integrity-manifest-only-larger", "swallow_titan/checkpoint/integrity.py",
        "elif os.path.getsize(full) != size:", "elif os.path.getsize(full) > size:",
        CHECKPOINTS, "a file shorter than the manifest says is accepted",
    ),
    Mutation(
        "prune-resumed-from-unprotected", "swallow_titan/checkpoint/integrity.py",
        "keep = set(good[-keep_latest_k:]) | protected", "keep = set(good[-keep_latest_k:])",
        CHECKPOINTS, "pruning deletes the checkpoint the run resumed from",
    ),
    Mutation(
        "prune-newer-broken-ones", "swallow_titan/checkpoint/integrity.py",
        "return sorted(s for s in complete if s < newest_good and s not in keep)",
        "return sorted(s for s in complete if s not in keep)",
        CHECKPOINTS, "pruning deletes broken checkpoints newer than the newest good one",
    ),
    Mutation(
        "staging-name-visible", "swallow_titan/checkpoint/integrity.py",
        'return f"{STAGING_PREFIX}step_{step}"', 'return f"{STAGING_PREFIX}step-{step}"',
        CHECKPOINTS, "a half-written checkpoint's name matches torchtitan's step-N search",
    ),
    Mutation(
        "publish-over-old-folder", "swallow_titan/checkpoint/manager.py",
        "        if os.path.exists(final):\n", "        if False:\n",
        CHECKPOINTS, "a new save does not move a broken checkpoint of its step away",
    ),
    Mutation(
        "resume-oldest-complete", "swallow_titan/checkpoint/manager.py",
        "for step in sorted(steps, reverse=True):", "for step in sorted(steps):",
        CHECKPOINTS, "resume picks the oldest complete checkpoint",
    ),
    # ------------------------------------------------------------------- start rule
    Mutation(
        "start-hf-beats-own-checkpoint", "swallow_titan/components/start_rule.py",
        "    if steps:\n", "    if steps and not hf_path:\n",
        START, "HF weights win over the run's own checkpoint",
    ),
    Mutation(
        "start-dcp-beats-hf", "swallow_titan/components/start_rule.py",
        "    if hf_path:\n", "    if hf_path and not dcp_path:\n",
        START, "checkpoint.initial_load_path wins over [hf] load_path",
    ),
    Mutation(
        "start-resumes-oldest", "swallow_titan/components/start_rule.py",
        "else max(steps)", "else min(steps)",
        START, "the start rule names the oldest checkpoint",
    ),
    # ------------------------------------------------------------------------ guard
    Mutation(
        "guard-one-skip-too-many", "swallow_titan/components/guard.py",
        "if self.consecutive_skips >= self.max_consecutive_skips:",
        "if self.consecutive_skips > self.max_consecutive_skips:",
        GUARD, "max_consecutive_skips lets one more bad step through",
    ),
    Mutation(
        "guard-streak-never-reset", "swallow_titan/components/guard.py",
        "            self.consecutive_skips = 0\n            return True",
        "            return True",
        GUARD, "a good step does not end the streak of skipped steps",
    ),
    Mutation(
        "guard-optimizer-state-unchecked", "swallow_titan/components/guard.py",
        "            tensors += [\n", "            tensors += [] and [\n",
        GUARD, "optimizer state is not checked before a checkpoint",
    ),
    Mutation(
        "spike-downward-counts", "swallow_titan/components/guard.py",
        "if score > self.threshold:", "if abs(score) > self.threshold:",
        SPIKES, "a sudden fall of the loss is taken for a spike",
    ),
    Mutation(
        "spike-mad-unscaled", "swallow_titan/components/guard.py",
        "spread = MAD_TO_STD * _median(", "spread = _median(",
        SPIKES, "the spread is the bare MAD: jumps 1.48x smaller are flagged",
    ),
    Mutation(
        "trainer-checkpoints-nonfinite-state", "swallow_titan/trainer.py",
        "if not state_is_finite(self.model_parts, self.optimizers, self.device):",
        "if False:",
        ("tests/test_guard.py", "-k", "nonfinite_state_is_never"),
        "a checkpoint is written from a NaN state",
    ),
    # ------------------------------------------------------------- RMSNorm kernels
    Mutation(
        "kernels-rmsnorm-config-ignored", "swallow_titan/model/args.py",
        "self.rmsnorm_impl = job_config.kernels.rmsnorm", 'self.rmsnorm_impl = "torch"',
        ("tests/test_kernels_strength.py", "-k", "kernels_from"),
        "[kernels] rmsnorm is never applied to the model",
    ),
    Mutation(
        "rmsnorm-bwd-dw-overwritten", "kernels/rmsnorm.py",
        "dw += tl.sum(dy * x_hat, axis=0)", "dw = tl.sum(dy * x_hat, axis=0)",
        RMSNORM, "each program keeps only its last row block's weight gradient",
    ),
    Mutation(
        "rmsnorm-fused-unrounded-sum", "kernels/rmsnorm.py",
        "        x = h.to(tl.float32)\n", "        x = x + r.to(tl.float32)\n",
        RMSNORM, "the fused add+norm normalises the unrounded sum",
    ),
    Mutation(
        "rmsnorm-eps-outside-sqrt", "kernels/rmsnorm.py",
        "rstd = 1.0 / tl.sqrt(mean_sq + eps)", "rstd = 1.0 / (tl.sqrt(mean_sq) + eps)",
        RMSNORM, "eps added after the square root",
    ),
    Mutation(
        "rmsnorm-bwd-drops-residual-grad", "kernels/rmsnorm.py",
        "            dx += dh.to(tl.float32)\n", "            dx += 0.0 * dh.to(tl.float32)\n",
        RMSNORM, "the gradient reaching the fused residual output is dropped",
    ),
    Mutation(
        "rmsnorm-autograd-residual-input", "kernels/rmsnorm.py",
        "return dsum.to(x_dtype), dsum.to(r_dtype), dw, None",
        "return dsum.to(x_dtype), None, dw, None",
        RMSNORM, "the residual input of the fused op gets no gradient",
    ),
    # ---------------------------------------------------------- fused loss kernels
    Mutation(
        "ce-grad-target-not-subtracted", "kernels/cross_entropy.py",
        "grad = tl.where(is_target, grad - 1.0, grad)", "grad = tl.where(is_target, grad, grad)",
        CROSS_ENTROPY, "the target's -1 is missing from the logits gradient",
    ),
    Mutation(
        "ce-z-loss-grad-halved", "kernels/cross_entropy.py",
        "scale = tl.where(counted, 1.0 + 2.0 * z_loss * lse, 0.0)",
        "scale = tl.where(counted, 1.0 + z_loss * lse, 0.0)",
        CROSS_ENTROPY, "the z-loss term's derivative misses its factor 2",
    ),
    Mutation(
        "ce-ignored-tokens-get-gradients", "kernels/cross_entropy.py",
        "scale = tl.where(counted, 1.0 + 2.0 * z_loss * lse, 0.0)",
        "scale = 1.0 + 2.0 * z_loss * lse",
        CROSS_ENTROPY, "ignored tokens receive softmax gradients",
    ),
    Mutation(
        "ce-online-lse-not-rescaled", "kernels/cross_entropy.py",
        "run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max)",
        "run_sum = run_sum + tl.exp(x - new_max)",
        CROSS_ENTROPY, "the running sum is not rescaled when the running max grows",
    ),
    Mutation(
        "ce-weight-grad-last-chunk-only", "kernels/cross_entropy.py",
        "dw.addmm_(dlogits.t(), h)", "dw.copy_(dlogits.t() @ h)",
        CROSS_ENTROPY, "the weight gradient keeps only the last chunk",
    ),
    Mutation(
        "ce-autograd-ignores-upstream-grad", "kernels/cross_entropy.py",
        "grad = grad.mul_(g_loss) if in_place else grad * g_loss",
        "grad = grad",
        CROSS_ENTROPY, "backward ignores the gradient flowing into the loss",
    ),
    # -------------------------------------------------- HF mapping and RoPE settings
    Mutation(
        "hf-permutation-ignores-gqa", "swallow_titan/hf/weights.py",
        "return family_of_args(args).state_dict_adapter(args, None)",
        "return family_of_args(args).state_dict_adapter(replace(args, n_kv_heads=args.n_heads), None)",
        HF, "the q/k RoPE permutation treats k as having every head",
    ),
    Mutation(
        "hf-rope-low-high-swapped", "swallow_titan/hf/config.py",
        'low_freq_factor=float(entry["low_freq_factor"]),',
        'low_freq_factor=float(entry["high_freq_factor"]),',
        HF, "llama3 RoPE's low frequency factor read from the high one",
    ),
    Mutation(
        "hf-kv-heads-default", "swallow_titan/hf/config.py",
        'n_kv_heads = config.get("num_key_value_heads") or n_heads', "n_kv_heads = n_heads",
        HF, "num_key_value_heads ignored (no GQA)",
    ),
    Mutation(
        "hf-export-writes-heads-as-kv", "swallow_titan/hf/config.py",
        '"num_key_value_heads": args.n_kv_heads or args.n_heads,', '"num_key_value_heads": args.n_heads,',
        HF, "exported config.json claims as many KV heads as query heads",
    ),
    # ---------------------------------------------------------------------- run log
    Mutation(
        "run-log-keeps-redone-step", "swallow_titan/components/metrics.py",
        'kept = [r for r in read_run_log(self.path) if r["step"] < first_step]',
        'kept = [r for r in read_run_log(self.path) if r["step"] <= first_step]',
        ("tests/test_monitoring.py", "-k", "run_log and not tensorboard"),
        "a restart keeps the crashed attempt's record of the step it redoes",
    ),
)


# ============================================ edges (issue 18): data, metrics,
# validation, pre-emption, export, model card. Kept as one block of its own.
DATA_EDGES = ("tests/test_data_edges.py",)
METRICS_EDGES = ("tests/test_monitoring.py", "-k",
                 "(run_log and not tensorboard) or follow_from or validation_mean")
PREEMPTION = ("tests/test_preemption.py",)
EXPORT_EDGES = ("tests/test_hf_interop.py", "-k", "exactly_fills or bf16_export or other_than")
CARD = ("tests/test_model_card.py",)

EDGE_MUTATIONS: tuple[Mutation, ...] = (
    # --------------------------------------------------------------- run log, metrics
    Mutation(
        "run-log-torn-line-merges", "swallow_titan/components/metrics.py",
        'data = b"\\n" + data', "data = data",
        METRICS_EDGES, "after a short write the next record continues the torn line",
    ),
    Mutation(
        "run-log-write-error-raises", "swallow_titan/components/metrics.py",
        "        except OSError as e:\n            error = e\n",
        "        except BlockingIOError as e:\n            error = e\n",
        METRICS_EDGES, "a full disk raises out of the metrics rank's log call",
    ),
    Mutation(
        "run-log-bad-line-raises", "swallow_titan/components/metrics.py",
        "        except ValueError as e:\n", "        except KeyError as e:\n",
        METRICS_EDGES, "one malformed line makes every restart raise",
    ),
    Mutation(
        "metrics-tps-counts-every-gpu", "swallow_titan/components/metrics.py",
        "interval * self.parallel_dims.non_data_parallel_size", "interval",
        METRICS_EDGES, "tokens/s per GPU not shared among the TP/CP/PP GPUs of a rank",
    ),
    Mutation(
        "metrics-mfu-a-fraction", "swallow_titan/components/metrics.py",
        'scalars[SCALARS["mfu"]] = 100 * flops / self.peak_flops',
        'scalars[SCALARS["mfu"]] = flops / self.peak_flops',
        METRICS_EDGES, "MFU logged as a fraction under a percent tag",
    ),
    Mutation(
        "metrics-step-time-whole-interval", "swallow_titan/components/metrics.py",
        'SCALARS["step_time"]: interval / steps_in_interval,', 'SCALARS["step_time"]: interval,',
        METRICS_EDGES, "step time is the time since the last log, not per step",
    ),
    Mutation(
        "metrics-val-mean-is-sum", "swallow_titan/components/metrics.py",
        "mean = sum(losses.values()) / len(losses)", "mean = sum(losses.values())",
        METRICS_EDGES, "val/loss is the sum of the sets' losses",
    ),
    # ------------------------------------------------------------------- Megatron
    Mutation(
        "megatron-newer-version-accepted", "swallow_titan/data/megatron.py",
        "if version != INDEX_VERSION:", "if version < INDEX_VERSION:",
        DATA_EDGES, "an index of a later, unknown version is read as version 1",
    ),
    Mutation(
        "megatron-multimodal-refused", "swallow_titan/data/megatron.py",
        "if idx_bytes not in (arrays, arrays + sequences):", "if idx_bytes != arrays:",
        DATA_EDGES, "an index with its int8 sequence modes is called truncated",
    ),
    Mutation(
        "megatron-vocab-end-accepted", "swallow_titan/data/megatron.py",
        "(whole >= vocab_size)", "(whole > vocab_size)",
        DATA_EDGES, "an id equal to the vocabulary size passes the check",
    ),
    Mutation(
        "megatron-boundaries-may-be-empty", "swallow_titan/data/megatron.py",
        "lo, hi = bounds[-1] + 1, docs - (pieces - i)", "lo, hi = bounds[-1] + 1, docs",
        DATA_EDGES, "a skewed file is cut into pieces without documents",
    ),
    Mutation(
        "megatron-sampled-count-unscaled", "swallow_titan/data/megatron.py",
        "stored = round(stored * docs / len(picked))", "stored = stored",
        DATA_EDGES, "the sample's BOS/EOS count is used for the whole file",
    ),
    # ------------------------------------------------------------------ tokenizer
    Mutation(
        "tokenizer-long-text-drops-cut-char", "swallow_titan/data/tokenizer.py",
        "        start = end\n", "        start = end + 1\n",
        DATA_EDGES, "a text longer than a piece loses the character it is cut at",
    ),
    Mutation(
        "tokenizer-json-specials-beyond-slots", "swallow_titan/data/tokenizer.py",
        'if first_special <= tok["id"] < first_special + NUM_SPECIAL_TOKENS',
        'if first_special <= tok["id"]',
        DATA_EDGES, "a special id past the 256 slots (<|image|>) gets no embedding",
    ),
    # ------------------------------------------------------------------- sharding
    Mutation(
        "sharding-smallest-unit-first", "swallow_titan/data/sharding.py",
        "key=lambda u: (-units[u].size, u)", "key=lambda u: (units[u].size, u)",
        DATA_EDGES, "units are dealt smallest first (no LPT bound on the imbalance)",
    ),
    Mutation(
        "sharding-share-remainders-dropped", "swallow_titan/data/sharding.py",
        "floors[u] += 1", "floors[u] += 0",
        DATA_EDGES, "slots left by rounding get no unit",
    ),
    Mutation(
        "sharding-json-lines-below-min-range", "swallow_titan/data/sharding.py",
        "pieces = max(1, min(math.ceil(slots * f.size / total), f.size // MIN_RANGE_BYTES))",
        "pieces = max(1, math.ceil(slots * f.size / total))",
        DATA_EDGES, "a small file is cut into ranges that may hold no line start",
    ),
    Mutation(
        "pretokenize-row-groups-not-joined", "swallow_titan/data/sharding.py",
        "if join_row_groups and total > 0:", "if False:",
        ("tests/test_pretokenize.py", "-k", "parquet"),
        "every Parquet row group becomes its own pair, whatever --shard-mb",
    ),
    # ----------------------------------------------------------------- validation
    Mutation(
        "validation-set-repeats-documents", "swallow_titan/components/validation.py",
        '"weight": 1.0, "max_epochs": 1}', '"weight": 1.0, "max_epochs": 0}',
        ("tests/test_validation_sets.py", "-k", "fewer_documents"),
        "a set smaller than asked repeats its documents to fill the windows",
    ),
    # ---------------------------------------------------------------- pre-emption
    Mutation(
        "preemption-last-signal-wins", "swallow_titan/runtime/preemption.py",
        "if self.received is None:", "if True:",
        PREEMPTION, "a later signal replaces the one that stopped the run",
    ),
    Mutation(
        "preemption-restore-to-default", "swallow_titan/runtime/preemption.py",
        "signal.signal(sig, handler)", "signal.signal(sig, signal.SIG_DFL)",
        PREEMPTION, "restore sets the default handlers, not the previous ones",
    ),
    # --------------------------------------------------------- export, model card
    Mutation(
        "export-exact-fit-opens-a-shard", "swallow_titan/hf/export.py",
        "if current and current_bytes + nbytes > max_bytes:",
        "if current and current_bytes + nbytes >= max_bytes:",
        EXPORT_EDGES, "a tensor that exactly fills a shard starts a new one",
    ),
    Mutation(
        "export-index-counts-fp32-bytes", "swallow_titan/hf/export.py",
        "itemsize = torch.empty((), dtype=target).element_size()", "itemsize = 4",
        EXPORT_EDGES, "a bf16 export's index and shard plan count fp32 bytes",
    ),
    Mutation(
        "card-billions-from-above", "swallow_titan/hf/model_card.py",
        "if n >= 1e9:", "if n > 1e9:",
        CARD, "exactly 1e9 tokens is shown as 1000.00M",
    ),
    Mutation(
        "card-min-lr-is-peak", "swallow_titan/hf/model_card.py",
        "min_lr = lr * min_lr_factor if", "min_lr = lr if",
        CARD, "the card's minimum learning rate is the peak one",
    ),
)

MUTATIONS = MUTATIONS + EDGE_MUTATIONS


# ------------------------------------------------ evaluation (issue 18, item 11)
# The lm-eval adapter, its cost estimate and task handling, caught by the fast
# in-process tests (a model with known answers; lm-eval's own task index).
EVAL_ADAPTER = ("tests/test_eval_adapter.py",)
EVAL_TASK_FILES = ("tests/test_eval_tasks.py", "-k", "not built_in")

EVAL_MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "eval-empty-continuation-scored", "swallow_titan/eval/adapter.py",
        "scored = [i for i, (_, n) in enumerate(windows) if n > 0]",
        "scored = list(range(len(windows)))",
        EVAL_ADAPTER, "a request with no continuation token is sent to scoring",
    ),
    Mutation(
        "eval-long-input-keeps-first-tokens", "swallow_titan/eval/adapter.py",
        "whole = (context + continuation)[-(self._max_length + 1) :]",
        "whole = (context + continuation)[: self._max_length + 1]",
        EVAL_ADAPTER, "an input longer than the model keeps its first tokens, not its last",
    ),
    Mutation(
        "eval-long-continuation-not-capped", "swallow_titan/eval/adapter.py",
        "windows.append((whole, min(len(continuation), len(whole) - 1)))",
        "windows.append((whole, len(continuation)))",
        EVAL_ADAPTER, "a continuation longer than the model is scored past its window",
    ),
    Mutation(
        "eval-scored-positions-one-late", "swallow_titan/eval/adapter.py",
        "_rows(logits, row, len(windows[i][0]) - 1 - windows[i][1], len(windows[i][0]) - 1)",
        "_rows(logits, row, len(windows[i][0]) - windows[i][1], len(windows[i][0]))",
        EVAL_ADAPTER, "each continuation token is scored with the logits of the position after it",
    ),
    Mutation(
        "eval-share-shortest-first", "swallow_titan/eval/adapter.py",
        "order = sorted(range(len(lengths)), key=lambda i: -lengths[i])",
        "order = sorted(range(len(lengths)), key=lambda i: lengths[i])",
        EVAL_ADAPTER, "requests are dealt shortest first (batches mix lengths, padding grows)",
    ),
    Mutation(
        "eval-share-overlaps", "swallow_titan/eval/adapter.py",
        "return order[self.runner.dp_rank :: self.runner.dp_size]",
        "return order[self.runner.dp_rank :: max(self.runner.dp_size - 1, 1)]",
        EVAL_ADAPTER, "ranks' shares overlap and miss requests when counts are uneven",
    ),
    Mutation(
        "eval-stops-only-at-end-of-text", "swallow_titan/eval/adapter.py",
        "if generated[-1] in self._end_of_generation or len(generated) >= max_new:",
        "if generated[-1] == self.eot_token_id or len(generated) >= max_new:",
        EVAL_ADAPTER, "generation runs past <|eot_id|> (Llama 3.1 Instruct's end of turn)",
    ),
    Mutation(
        "eval-no-refill", "swallow_titan/eval/adapter.py",
        "while pending and len(active) < self.batch_size:",
        "while pending and not active and len(active) < self.batch_size:",
        EVAL_ADAPTER, "a batch decodes until its longest row ends before the next requests start",
    ),
    Mutation(
        "eval-held-failure-dropped", "swallow_titan/eval/lockstep.py",
        "return sync(value, device, error)", "return sync(value, device, None)",
        EVAL_ADAPTER, "a rank's failure is not reported at the next sync point",
    ),
    Mutation(
        "eval-cost-fraction-floored", "swallow_titan/eval/cost.py",
        "math.ceil(per_subtask * limit)", "int(per_subtask * limit)",
        EVAL_ADAPTER, "a fractional limit rounds down (lm-eval rounds up)",
    ),
    Mutation(
        "eval-cost-limit-not-capped", "swallow_titan/eval/cost.py",
        "min(per_subtask, int(limit))", "int(limit)",
        EVAL_ADAPTER, "a limit above a set's size counts examples the set does not have",
    ),
    Mutation(
        "eval-cost-no-final-evaluation", "swallow_titan/eval/cost.py",
        "return steps // freq + (1 if steps % freq else 0)", "return steps // freq",
        EVAL_ADAPTER, "the evaluation after the last step is not counted",
    ),
    Mutation(
        "eval-cost-generation-square", "swallow_titan/eval/cost.py",
        "return generated * prompt + generated * (generated - 1) // 2",
        "return generated * prompt + generated * generated // 2",
        EVAL_ADAPTER, "generation's forward tokens miscounted (pass k runs k earlier tokens)",
    ),
    Mutation(
        "eval-cost-efficiencies-swapped", "swallow_titan/eval/cost.py",
        "scoring / LOGLIKELIHOOD_EFFICIENCY + generating / GENERATION_EFFICIENCY",
        "scoring / GENERATION_EFFICIENCY + generating / LOGLIKELIHOOD_EFFICIENCY",
        EVAL_ADAPTER, "scoring and generation take each other's efficiency",
    ),
    Mutation(
        "eval-cost-choices-ignored", "swallow_titan/eval/cost.py",
        "n = examples_evaluated(cost, limit) * cost.requests", "n = examples_evaluated(cost, limit)",
        EVAL_ADAPTER, "a multiple-choice example costs one request, not one per choice",
    ),
    Mutation(
        "eval-tasks-group-members-unchecked", "swallow_titan/eval/tasks.py",
        "        if name in own.all_groups:\n", "        if False:\n",
        EVAL_TASK_FILES, "a local group naming a built-in task gets the local index only",
    ),
    Mutation(
        "eval-tasks-inline-group-members-skipped", "swallow_titan/eval/tasks.py",
        'names += group_members(item["task"]) if "task" in item else [item["group"]]',
        'names.append(item["group"])',
        EVAL_TASK_FILES, "the members of an inline group are not looked at",
    ),
    Mutation(
        "eval-tasks-rebuilt-every-evaluation", "swallow_titan/eval/in_loop.py",
        "tasks=built_tasks(tasks, eval_config.include_path),", "tasks=tasks,",
        EVAL_TASK_FILES, "every evaluation rebuilds its tasks and reloads their datasets",
    ),
    Mutation(
        "eval-tasks-stderr-logged", "swallow_titan/eval/tasks.py",
        'if "," not in key or "_stderr" in key:', 'if "," not in key:',
        EVAL_TASK_FILES, "standard errors are logged as metrics",
    ),
    Mutation(
        "eval-tasks-filter-dropped", "swallow_titan/eval/tasks.py",
        'name = metric if filter_name == "none" else f"{metric}_{filter_name}"',
        "name = metric",
        EVAL_TASK_FILES, "metrics of different filters overwrite each other",
    ),
)
MUTATIONS = MUTATIONS + EVAL_MUTATIONS

# ------------------------------------------------------------ Qwen3 (issue 20)
QWEN3_HF = ("tests/test_qwen3_hf.py",)
QWEN3_AUX = ("tests/test_qwen3_moe.py", "-k", "auxiliary_loss_is or reaches_the_routers")
QWEN3_TP_ATTENTION = ("tests/test_qwen3_moe.py", "-k", "attention_and_router")
QWEN3_CONFIG = ("tests/test_qwen3_config.py",)

QWEN3_MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "qwen3-hf-head-dim-from-hidden", "swallow_titan/hf/qwen3_config.py",
        'head_dim = config.get("head_dim") or dim // n_heads', "head_dim = dim // n_heads",
        QWEN3_HF, "head_dim derived from hidden / heads (Qwen3 decouples it)",
    ),
    Mutation(
        "qwen3-hf-norm-topk-ignored", "swallow_titan/hf/qwen3_config.py",
        'route_norm=bool(config.get("norm_topk_prob", False)),', "route_norm=False,",
        QWEN3_HF, "norm_topk_prob dropped: the top-k routing weights are not renormalised",
    ),
    Mutation(
        "qwen3-export-never-tied", "swallow_titan/hf/qwen3_config.py",
        '"tie_word_embeddings": bool(args.enable_weight_tying),', '"tie_word_embeddings": False,',
        QWEN3_HF, "the export of a tied model says untied (transformers then has no lm_head)",
    ),
    Mutation(
        "qwen3-aux-loss-without-expert-factor", "swallow_titan/model/qwen3.py",
        "return num_experts * (slots * probs.mean(dim=0)).sum()",
        "return (slots * probs.mean(dim=0)).sum()",
        QWEN3_AUX, "the auxiliary loss misses transformers' num_experts factor",
    ),
    Mutation(
        "qwen3-aux-gradient-unweighted", "swallow_titan/model/qwen3.py",
        "aux_grad = torch.full(ctx.aux_shape, ctx.weight,",
        "aux_grad = torch.full(ctx.aux_shape, 1.0,",
        QWEN3_AUX, "the auxiliary loss's gradient is not scaled by its coefficient",
    ),
    Mutation(
        "qwen3-cpu-attention-split-on-sequence", "swallow_titan/runtime/device.py",
        "return [every(Shard(1)), every(Replicate())]", "return [every(Shard(2)), every(Replicate())]",
        QWEN3_TP_ATTENTION, "TP attention on CPU split by sequence (each rank sees half the keys)",
    ),
    Mutation(
        "qwen3-op-ac-with-ep-accepted", "swallow_titan/components/preflight.py",
        'if ep > 1 and ac.mode == "selective" and ac.selective_ac_option == "op":',
        'if ep > 1 and ac.mode == "selective" and ac.selective_ac_option == "ops":',
        QWEN3_CONFIG, "per-op selective AC with EP (fails in backward) is not refused",
    ),
)
MUTATIONS = MUTATIONS + QWEN3_MUTATIONS


def scratch_copy() -> Path:
    """The working tree's files (tracked and untracked, not ignored) in a new folder."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    root = Path(tempfile.mkdtemp(prefix="swallow-mutation-"))
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    return root


def check_applies(mutation: Mutation, root: Path) -> str:
    text = (root / mutation.path).read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(
            f"{mutation.name}: the snippet occurs {count} times in {mutation.path} "
            "(expected once); update the mutation list"
        )
    return text


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return proc.returncode, proc.stdout + proc.stderr


def first_failure(output: str) -> str:
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    if not match:
        return "?"
    return match.group(1).split("::", 1)[-1].split("[")[0][:60]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="run these mutations only (names)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip checking that the selected tests pass unmutated")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or []) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"unknown mutations: {sorted(unknown)}")

    root = scratch_copy()
    try:
        for mutation in chosen:
            check_applies(mutation, root)
        if args.list:
            for m in chosen:
                print(f"{m.name:40} {m.path:38} {m.why}")
            return 0
        if not args.no_baseline:
            for tests in dict.fromkeys(m.tests for m in chosen):
                code, output = run_tests(root, tests, args.timeout)
                if code != 0:
                    print(output[-3000:])
                    raise SystemExit(f"the unmutated code fails {' '.join(tests)}")
        rows = []
        for mutation in chosen:
            path = root / mutation.path
            original = check_applies(mutation, root)
            path.write_text(original.replace(mutation.old, mutation.new))
            begin = time.monotonic()
            try:
                code, output = run_tests(root, mutation.tests, args.timeout)
            finally:
                path.write_text(original)
            seconds = time.monotonic() - begin
            if code == 1:
                verdict = first_failure(output)
            elif code == 0:
                verdict = "SURVIVED"
            else:
                verdict = f"ERROR (pytest status {code})"
            rows.append((mutation.name, mutation.path, verdict, seconds, code == 1))
            print(f"{mutation.name:40} {verdict:62} {seconds:6.1f}s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print()
    print("| bug | module | caught by | time |\n|---|---|---|---|")
    for name, path, verdict, seconds, _ in rows:
        print(f"| {name} | {path} | {verdict} | {seconds:.0f} s |")
    caught = sum(row[4] for row in rows)
    print(f"\n{caught} of {len(rows)} mutations caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
