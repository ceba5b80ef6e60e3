"""The README.md model card of an export: what was trained, on what, how far.

Everything comes from the run record (recipe, data sources, base model), the
checkpoint (steps, per-source token counts from the dataloader state) and the
run's TensorBoard events (final losses). What was not recorded is said to be
not recorded, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from swallow_titan.hf.run_record import RunRecord
from swallow_titan.hf.training_log import LoggedValue

NOT_RECORDED = "not recorded"


@dataclass
class TrainingSummary:
    """How far the exported checkpoint was trained."""

    step: int | None
    tokens_trained: int | None
    source_tokens: dict[str, int] | None
    training_loss: LoggedValue | None
    validation_loss: LoggedValue | None
    # Per [[validation.sets]] entry, by set name (e.g. how Japanese and English moved).
    validation_loss_by_set: dict[str, LoggedValue | None] = field(default_factory=dict)
    # The last [eval] at or before the step: (step, {"<task>/<metric>": value}).
    evaluation: tuple[int, dict[str, float]] | None = None
    # The [guard]'s loss-spike events of the checkpoint's trajectory (None: the
    # checkpoint records none, e.g. written before spike detection existed).
    spike_events: list[dict[str, Any]] | None = None


def _get(tree: dict[str, Any] | None, path: str) -> Any:
    node: Any = tree
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _count(n: int | None) -> str:
    if n is None:
        return NOT_RECORDED
    if n >= 1e9:
        return f"{n:,} ({n / 1e9:.2f}B)"
    if n >= 1e6:
        return f"{n:,} ({n / 1e6:.2f}M)"
    return f"{n:,}"


def _loss(value: LoggedValue | None) -> str:
    if value is None:
        return NOT_RECORDED
    return f"{value.value:.4f} (step {value.step}, `{value.tag}`)"


def _value(v: Any) -> str:
    if v is None:
        return NOT_RECORDED
    return f"`{v:g}`" if isinstance(v, float) else f"`{v}`"


def _architecture(config: dict[str, Any]) -> str:
    return (config.get("architectures") or ["LlamaForCausalLM"])[0]


def _ffn(config: dict[str, Any]) -> str:
    """The feed-forward layer: dense width, or experts (Qwen3-MoE)."""
    if config.get("num_experts"):
        return (
            f"{config['num_experts']} experts of width {config.get('moe_intermediate_size')}, "
            f"{config.get('num_experts_per_tok')} per token"
        )
    return f"FFN {config.get('intermediate_size')}"


def _rope(config: dict[str, Any]) -> str:
    scaling = config.get("rope_scaling")
    text = f"RoPE theta {config.get('rope_theta'):g}"
    if not scaling:
        return text + ", no scaling"
    details = ", ".join(f"{k} {v}" for k, v in scaling.items() if k != "rope_type")
    return text + f", {scaling.get('rope_type')} scaling ({details})"


def _front_matter(record: RunRecord, languages: list[str]) -> list[str]:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if record.base_model and "/" in record.base_model and not record.base_model.startswith(
        ("/", ".")
    ):
        lines.append(f"base_model: {record.base_model}")
    if languages:
        lines.append("language:")
        lines += [f"- {lang}" for lang in languages]
    family_tag = str(record.hf_config.get("model_type") or "llama").split("_")[0]
    lines += ["tags:", f"- {family_tag}", "- swallow-titan", "- continual-pretraining", "---", ""]
    return lines


def _hyper_parameters(job: dict[str, Any] | None, record: RunRecord) -> list[str]:
    if job is None:
        return [f"{NOT_RECORDED.capitalize()}: this checkpoint was converted, not trained here.", ""]
    lr = _get(job, "optimizer.lr")
    min_lr_factor = _get(job, "lr_scheduler.min_lr_factor")
    min_lr = lr * min_lr_factor if lr is not None and min_lr_factor is not None else None
    rows = [
        ("model flavor", _get(job, "model.flavor")),
        ("sequence length", _get(job, "training.seq_len")),
        ("global batch (sequences)", _get(job, "training.global_batch_size")),
        ("tokens per step", record.tokens_per_step),
        ("optimizer", _get(job, "optimizer.name")),
        ("learning rate", lr),
        ("minimum learning rate", min_lr),
        ("warm-up steps", _get(job, "lr_scheduler.warmup_steps")),
        ("decay", _get(job, "lr_scheduler.decay_type")),
        ("AdamW beta1 / beta2", f"{_get(job, 'optimizer.beta1')} / {_get(job, 'optimizer.beta2')}"),
        ("AdamW eps", _get(job, "optimizer.eps")),
        ("weight decay", _get(job, "optimizer.weight_decay")),
        ("gradient clipping (max norm)", _get(job, "training.max_norm")),
        ("parameter dtype / compute dtype", f"{_get(job, 'training.dtype')} / {_get(job, 'training.mixed_precision_param')}"),
        ("gradient reduction dtype", _get(job, "training.mixed_precision_reduce")),
        ("planned steps", _get(job, "training.steps")),
    ]
    lines = ["| hyper-parameter | value |", "|---|---|"]
    lines += [f"| {name} | {_value(v)} |" for name, v in rows]
    return lines + [""]


def _target_shares(
    job: dict[str, Any] | None, sources: list[dict[str, Any]]
) -> list[tuple[str, dict[str, float]]]:
    """(column title, source -> share) for each mixture of the run.

    One column from the sources' ``weight`` without ``[[data.stages]]``; with
    stages, one column per stage from its ``weights`` (an unlisted source has
    weight 0 there), since the sources' own weights are then not used.
    """
    stages = _get(job, "data.stages") or []
    if not stages:
        weights = {s.get("name", "?"): float(s.get("weight", 0.0)) for s in sources}
        mixtures = [("target share", weights)]
    else:
        mixtures = []
        first = 1
        for stage in stages:
            until = stage.get("until_step")
            last = until if until else _get(job, "training.steps")
            span = f"steps {first:,}-{last:,}" if last else f"from step {first:,}"
            listed = stage.get("weights") or {}
            weights = {s.get("name", "?"): float(listed.get(s.get("name"), 0.0)) for s in sources}
            mixtures.append((f"{stage.get('name', '?')} ({span})", weights))
            first = (until or 0) + 1
    return [
        (title, {name: w / (sum(weights.values()) or 1.0) for name, w in weights.items()})
        for title, weights in mixtures
    ]


def _data_mixture(job: dict[str, Any] | None, source_tokens: dict[str, int] | None) -> list[str]:
    sources = _get(job, "data.sources") or []
    if not sources:
        return [f"Data mixture: {NOT_RECORDED}.", ""]
    shares = _target_shares(job, sources)
    total_tokens = sum(source_tokens.values()) if source_tokens else 0
    titles = " | ".join(title for title, _ in shares)
    lines = [
        f"| source | domain | data | {titles} | tokens trained | actual share |",
        "|---|---|---|" + "---|" * len(shares) + "---|---|",
    ]
    for s in sources:
        name = s.get("name", "?")
        where = s.get("hf_dataset") or s.get("path") or "?"
        if s.get("hf_dataset") and s.get("hf_config"):
            where += f" ({s['hf_config']})"
        tokens = source_tokens.get(name) if source_tokens else None
        actual = f"{tokens / total_tokens:.1%}" if tokens is not None and total_tokens else NOT_RECORDED
        targets = " | ".join(f"{share[name]:.1%}" for _, share in shares)
        lines.append(
            f"| {name} | {s.get('domain', '')} | `{where}` | {targets} | {_count(tokens)} | {actual} |"
        )
    if not source_tokens:
        lines += ["", f"Per-source token counts: {NOT_RECORDED} in this checkpoint."]
    return lines + [""]


def _evaluation(evaluation: tuple[int, dict[str, float]] | None) -> list[str]:
    """The last in-loop lm-eval results as a table (nothing when none was logged)."""
    if not evaluation:
        return []
    step, values = evaluation
    lines = [
        "### Downstream evaluation",
        "",
        f"lm-evaluation-harness, in-loop at step {step:,} (`[eval]` settings in the recipe "
        "below; `eval/<task>/<metric>` in TensorBoard):",
        "",
        "| task | metric | value |",
        "|---|---|---|",
    ]
    for name, value in values.items():
        task, _, metric = name.rpartition("/")
        lines.append(f"| {task} | {metric} | {value:.4f} |")
    return [*lines, ""]


def _averaged_weights(record: RunRecord) -> list[str]:
    """Which average the weights are, and how it was made (nothing for plain weights).

    An offline average (``python -m swallow_titan.average``) lists its
    checkpoints; an average kept while training (``[averaging]``) states its
    kind and settings.
    """
    if not record.averaged_from and not record.averaged_in_loop:
        return []
    lines = ["### Averaged weights", ""]
    if record.averaged_in_loop:
        return [*lines, _in_loop_average(record.averaged_in_loop), ""]
    lines += [
        f"These weights are the weighted mean of {len(record.averaged_from)} checkpoints "
        "(`python -m swallow_titan.average`, fp32 accumulation):",
        "",
        "| step | weight | checkpoint |",
        "|---|---|---|",
    ]
    for entry in record.averaged_from:
        lines.append(
            f"| {_value(entry.get('step'))} | {entry.get('weight', 0.0):.6g} | "
            f"`{entry.get('checkpoint')}` |"
        )
    return [*lines, ""]


def _in_loop_average(average: dict[str, Any]) -> str:
    """One paragraph on an ``[averaging]`` average: EMA with its decay, or tail with its window."""
    step = average.get("step")
    if average.get("kind") == "ema":
        d = average["ema_decay"]
        return (
            f"These weights are the **exponential moving average (EMA)** of the trained weights, "
            f"kept in fp32 during training up to step {_value(step)}: after every step "
            f"`ema = ema * {d:g} + w * {1 - d:g}` (`[averaging] ema_decay = {d:g}`, which spans "
            f"about {1 / (1 - d):,.0f} steps). They are not the weights of the last step, which "
            "are exported beside them."
        )
    first, k = average.get("first_step"), average.get("tail_steps")
    return (
        f"These weights are the **tail average**: the uniform mean, accumulated in fp32 during "
        f"training, of the weights after each of steps {_value(first)}-{_value(step)} "
        f"(`[averaging] tail_steps = {k}`). They are not the weights of the last step, which "
        "are exported beside them."
    )


def _spikes(events: list[dict[str, Any]] | None) -> list[str]:
    """The loss spikes of the run ([guard] on_spike) as a table."""
    lines = ["### Loss spikes", ""]
    if events is None:
        return [*lines, f"Loss-spike events: {NOT_RECORDED} in this checkpoint.", ""]
    if not events:
        return [*lines, "None detected (`[guard]` spike detection, settings in the recipe).", ""]
    lines += [
        f"{len(events)} detected by the `[guard]` (training loss or gradient norm far above "
        "the median of its rolling window; `spike/*` in TensorBoard and metrics.jsonl):",
        "",
        "| step | data batch | what spiked | action | loss by domain |",
        "|---|---|---|---|---|",
    ]
    for e in events:
        what = ", ".join(
            f"{metric} {found['value']:.4g} (median {found['median']:.4g})"
            for metric, found in e["spikes"].items()
        )
        action = e["action"]
        if action == "rollback":
            first, last = e["skipped_batches"]
            action += f" to step {e['rolled_back_to']}, data batches {first}-{last} skipped"
        domains = ", ".join(f"{d} {v:.4g}" for d, v in (e.get("domain_losses") or {}).items())
        lines.append(f"| {e['step']} | {e['data_batch']} | {what} | {action} | {domains} |")
    return [*lines, ""]


def render_model_card(
    record: RunRecord, summary: TrainingSummary, *, title: str, model_id: str, dtype: str
) -> str:
    """The README.md of an export; ``model_id`` is what ``from_pretrained`` takes."""
    job = record.job_config
    languages = sorted(
        {
            s.get("domain")
            for s in (_get(job, "data.sources") or [])
            if s.get("domain") in ("ja", "en")
        }
    )
    config = record.hf_config
    lines = _front_matter(record, languages)
    lines += [f"# {title}", ""]
    base = record.base_model or "random initialisation (no base model)"
    description = _get(job, "job.description")
    lines += [
        f"Continual pre-training of **{base}**"
        + (f" ({description})" if description else "")
        + ", trained with [swallow-titan](https://github.com/swallow-titan/swallow-titan) "
        "(torchtitan) and exported to Hugging Face format.",
        "",
        "## Model",
        "",
        f"- Architecture: `{_architecture(config)}`, {config.get('num_hidden_layers')} layers, "
        f"hidden size {config.get('hidden_size')}, {config.get('num_attention_heads')} attention "
        f"heads, {config.get('num_key_value_heads')} KV heads, {_ffn(config)}, "
        f"vocabulary {config.get('vocab_size'):,}"
        + (", tied embeddings" if config.get("tie_word_embeddings") else ""),
        f"- {_rope(config)}",
        f"- Weights: `{dtype}`",
        f"- Base model: {base}",
        "",
        "## Training",
        "",
        f"- Steps trained: {_value(summary.step)}",
        f"- Tokens trained: {_count(summary.tokens_trained)}",
        f"- Final training loss: {_loss(summary.training_loss)}",
        f"- Final validation loss: {_loss(summary.validation_loss)}",
        *(
            f"  - {name}: {_loss(value)}"
            for name, value in summary.validation_loss_by_set.items()
        ),
        "",
    ]
    lines += _averaged_weights(record)
    lines += _evaluation(summary.evaluation)
    lines += _spikes(summary.spike_events)
    lines += [
        "### Recipe",
        "",
    ]
    lines += _hyper_parameters(job, record)
    lines += ["### Data mixture", ""]
    lines += _data_mixture(job, summary.source_tokens)
    lines += [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{model_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")',
        "```",
        "",
    ]
    return "\n".join(lines)
