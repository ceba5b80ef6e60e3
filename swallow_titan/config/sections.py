"""swallow-titan's TOML sections, merged into torchtitan's ``JobConfig``.

torchtitan merges a custom ``JobConfig`` dataclass into its own (see
``ConfigManager._merge_configs``): sections that exist in both are merged field
by field, new sections are added. This module is that custom ``JobConfig``;
``swallow_titan.config.manager`` always merges it, and stock torchtitan can use
it through ``--job.custom_config_module swallow_titan.config.sections``.

No ``from __future__ import annotations`` here: torchtitan and tyro read the
field types at run time.
"""

from dataclasses import dataclass, field
from typing import Literal

# The model names the TrainSpecs are registered under ([model] name): the
# model family. "swallow" is Llama-3.1 (torchtitan's llama3 model),
# "swallow_qwen3" is Qwen3, dense and MoE (torchtitan's qwen3 model).
MODEL_NAME = "swallow"
QWEN3_MODEL_NAME = "swallow_qwen3"
MODEL_NAMES = (MODEL_NAME, QWEN3_MODEL_NAME)
# Option values the code branches on.
TRITON_NORM = "triton"  # kernels.rmsnorm
FUSED_LOSS = "fused_linear_ce"  # kernels.loss
FLOAT8_CONVERTER = "quantize.linear.float8"  # an entry of model.converters
AUX_LOSS = "aux_loss"  # moe.load_balance
AUX_LOSS_FREE = "aux_loss_free"  # moe.load_balance


@dataclass
class DataSource:
    """One ``[[data.sources]]`` entry: where documents come from and their share."""

    name: str = ""
    """Unique name, used in logs, metrics and the data state of checkpoints."""

    weight: float = 1.0
    """Share of training tokens (weights are normalised over all sources)."""

    domain: str = "any"
    """Label for metrics and reports, e.g. ja, en, code or math."""

    path: str = ""
    """Local files: a path or glob of .jsonl, .jsonl.gz, .json or .parquet
    (with ``format = "megatron"``: of Megatron .bin files, each with its .idx)."""

    format: Literal["text", "megatron"] = "text"
    """"text": documents are text records, tokenised while training.
    "megatron": Megatron-LM indexed datasets (.bin + .idx) of token ids, read
    without a tokenizer (ids checked against its vocabulary)."""

    hf_dataset: str = ""
    """A Hugging Face hub dataset id (read with streaming); excludes ``path``."""

    hf_config: str = ""
    """Hub dataset configuration name, if the dataset has several."""

    split: str = "train"
    """Dataset split to read."""

    revision: str = ""
    """Hub revision (branch, tag or commit) to pin."""

    text_field: str = "text"
    """Field of each record that holds the document text."""

    max_epochs: float = 0.0
    """Stop the source after this many passes; 0 means repeat without limit."""

    num_tokens: float = 0.0
    """The source's size in tokens as the user knows it (e.g. from its dataset
    card: SwallowCode ~16.1e9, SwallowMath ~2.3e9); 0 = unknown. Only the plan
    uses it, to show how many epochs the run reads the source."""


@dataclass
class MixtureStage:
    """One ``[[data.stages]]`` entry: the mixture for a range of steps."""

    name: str = ""
    """Unique name, shown in logs, the plan and the data CLI."""

    until_step: int = 0
    """Last step of the stage; the stage after it starts at the next step. The
    last stage runs to the end of training (its until_step may be left out)."""

    weights: dict[str, float] = field(default_factory=dict)
    """Source name -> weight in this stage; a source not listed has weight 0."""


@dataclass
class Data:
    """``[data]``: the training document sources and how they are packed."""

    sources: list[DataSource] = field(default_factory=list)
    """The ``[[data.sources]]`` entries."""

    stages: list[MixtureStage] = field(default_factory=list)
    """The ``[[data.stages]]`` entries, in order; without any, the sources'
    ``weight`` is the mixture for the whole run."""

    seed: int = 1234
    """Seed of the data order (document shuffling; the mixture needs none)."""

    shuffle_block_docs: int = 1024
    """Each slot reads a source's documents in blocks of this many and permutes
    every block (seeded), after shuffling its file order per epoch; 0 keeps the
    files' order."""

    max_document_chars: int = 20_000_000
    """Documents longer than this are skipped (and counted as "too_long");
    shorter ones of any length are split across windows."""

    reset_position_ids: bool = False
    """Give the model position ids that restart at every document (Megatron's
    --reset-position-ids). Pair with ``[model] attn_mask_type = "block_causal"``
    to also block attention across documents."""


@dataclass
class Model:
    """Additions to torchtitan's ``[model]`` section."""

    attn_type: Literal["sdpa", "flex", "varlen"] = "sdpa"
    """Attention implementation; "flex" or "varlen" are needed for document masking."""

    attn_mask_type: Literal["causal", "block_causal"] = "causal"
    """"block_causal" masks attention across documents (needs flex or varlen)."""

    tokenizer_kind: Literal["auto", "llama3", "qwen"] = "auto"
    """The tokenizer family in ``hf_assets_path`` and so the document framing:
    "llama3" (tiktoken; BOS + doc + EOS), "qwen" (Qwen2/2.5/3 tokenizer.json;
    doc + <|endoftext|>, no BOS). "auto" reads it from the file: a
    tokenizer.model, or a tokenizer.json with <|begin_of_text|>, is llama3; a
    tokenizer.json with <|endoftext|> and no <|begin_of_text|> is qwen."""


@dataclass
class Checkpoint:
    """Changed defaults of torchtitan's ``[checkpoint]`` section."""

    last_save_model_only: bool = False
    """torchtitan saves only the model at the last step by default, and a run
    extended later cannot resume from that; swallow-titan saves everything."""


@dataclass
class ValidationSet(DataSource):
    """One ``[[validation.sets]]`` entry: a labelled held-out set.

    The source keys are those of ``[[data.sources]]`` (``path`` or
    ``hf_dataset`` + ``hf_config``/``split``/``revision``, ``text_field``);
    ``weight`` and ``max_epochs`` have no meaning here. The set is the first
    ``sequences`` packed windows of its documents, the same at every
    validation. Held out means: files (or a split) that no ``[[data.sources]]``
    entry reads; the config check rejects a set that shares files with training.
    """

    sequences: int = 64
    """Windows of ``validation.seq_len`` tokens to evaluate, rounded down to a
    multiple of validation.local_batch_size x data-parallel degree."""


@dataclass
class Validation:
    """Additions to torchtitan's ``[validation]`` section."""

    sets: list[ValidationSet] = field(default_factory=list)
    """The ``[[validation.sets]]`` entries, each logged as val/<name>/loss."""


@dataclass
class Guard:
    """``[guard]``: what to do when a step's loss or gradient norm is NaN/Inf or spikes."""

    on_nonfinite: Literal["skip", "stop"] = "skip"
    """"skip": drop the step's update (the data is consumed, the LR schedule
    advances); "stop": end the run with an error at once."""

    max_consecutive_skips: int = 5
    """With "skip": stop with an error after this many non-finite steps in a row
    (and, with on_spike = "skip", after this many skipped spikes in a row)."""

    on_spike: Literal["off", "log", "skip", "rollback"] = "log"
    """A loss spike: the step's training loss or gradient norm (those in
    ``spike_metrics``) lies more than ``spike_threshold`` robust standard
    deviations above the median of its last ``spike_window`` values. "log":
    record the event (run log, TensorBoard, model card) with the per-domain
    losses; "skip": also drop the step's update, like a non-finite step;
    "rollback": reload the newest checkpoint, skip the data from it up to and
    including the spike's batch, go on; "off": no detection. See docs/stability.md."""

    spike_window: int = 128
    """Steps in the rolling window (OLMo-core's stability monitor: 128). Nothing
    is judged before the window is full."""

    spike_threshold: float = 6.0
    """Robust standard deviations (1.4826 x median absolute deviation) above the
    window's median that make a spike (OLMo-core: 6 standard deviations)."""

    spike_metrics: list[str] = field(default_factory=lambda: ["loss", "grad_norm"])
    """What is watched: "loss" (the global training loss), "grad_norm" (the
    global gradient norm before clipping)."""

    max_rollbacks: int = 3
    """With on_spike = "rollback": a spike after this many rollbacks ends the
    run with exit status 6 (0: the first spike does)."""


@dataclass
class Averaging:
    """``[averaging]``: averaged weights kept beside the trained ones (fp32, sharded
    like the parameters: one extra copy of this rank's shards per kind), in every
    checkpoint, validated as val/ema/... and val/tail/... (and with [eval] evaluated
    after the last step as eval/ema/... and eval/tail/...), written after the last step."""

    ema_decay: float = 0.0
    """Exponential moving average of the weights, ``ema = ema * d + w * (1 - d)``
    after every step; 0 is off. The average spans about 1 / (1 - d) steps."""

    tail_steps: int = 0
    """Average the weights after each of the last this many steps before every
    ``tail_every``-th step and the last step (OLMo-core's checkpoint merging); 0 is off."""

    tail_every: int = 0
    """Steps between tail-window ends; 0 is checkpoint.interval (a tail average is
    complete in every regular checkpoint)."""


@dataclass
class Debug:
    """Additions to torchtitan's ``[debug]`` section: test hooks, not for real runs."""

    inject_nonfinite_at_steps: list[int] = field(default_factory=list)
    """Multiply the loss by NaN at these steps (tests the ``[guard]`` policy)."""

    checkpoint_publish_delay_s: float = 0.0
    """Sleep this long after a checkpoint is written and before it is published
    (lets tests kill a run in the middle of a save)."""

    inject_eval_failure_at_steps: list[int] = field(default_factory=list)
    """Make ``[eval]`` fail at these steps on rank ``inject_eval_failure_rank``
    only, while it reads its first batch's logits (tests that every rank
    leaves the evaluation together)."""

    inject_eval_failure_rank: int = 0
    """The rank ``inject_eval_failure_at_steps`` fails on."""

    eval_delay_s: float = 0.0
    """Sleep this long at the start of every ``[eval]`` evaluation (lets tests
    kill a run during one)."""


@dataclass
class Kernels:
    """``[kernels]``: swallow-titan's Triton kernels (``kernels/``), off by default.

    On a machine without a GPU they run only under Triton's interpreter
    (``TRITON_INTERPRET=1`` in the environment; slow, for tests).
    """

    rmsnorm: Literal["torch", "triton"] = "torch"
    """"triton": every RMSNorm runs the Triton kernel, and each block's second
    norm is fused with the residual add before it."""

    loss: Literal["torch", "fused_linear_ce"] = "torch"
    """"fused_linear_ce": the output layer computes the cross-entropy itself,
    chunk by chunk, and the [tokens, vocab] logits are never materialised."""

    z_loss: float = 0.0
    """Coefficient of the z-loss ``z * logsumexp(logits)^2`` per token (Swallow's
    fork used 1e-4); 0 turns it off. Applies to both losses; the training loss
    includes it and ``train/z_loss`` reports it alone."""


@dataclass
class HF:
    """``[hf]``: start from Hugging Face weights, export Hub-ready weights at the end."""

    load_path: str = ""
    """A Hugging Face model folder (config.json + *.safetensors [+ index]) that a
    new run starts from. Read only when the run's checkpoint folder holds no
    checkpoint; otherwise the run resumes from its own checkpoint (both logged).
    config.json must match the flavor."""

    base_model: str = ""
    """Hub id of the starting model for the exported model card, e.g.
    "meta-llama/Llama-3.1-8B-Instruct"."""

    export_at_end: bool = False
    """After the last step, export the final checkpoint as a Hub-ready folder
    (needs checkpoint.enable)."""

    export_folder: str = "hf"
    """Where exports go, relative to job.dump_folder: <export_folder>/step-<N>."""

    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Data type of the exported weights."""

    export_max_shard_size: str = "5GB"
    """Largest safetensors file of the export, e.g. "5GB" or "500MB"."""

    push_to_hub: str = ""
    """Hub repository id to upload the export to (token from HF_TOKEN or
    `huggingface-cli login`); empty: no upload."""

    push_private: bool = False
    """Create the Hub repository as private."""


@dataclass
class Eval:
    """``[eval]``: downstream evaluation with lm-evaluation-harness while training.

    Needs the ``eval`` extra (``pip install -e ".[eval]"``). Runs on the model
    as it is parallelized, after validation, every ``freq`` steps and after
    the last step; scalars ``eval/<task>/<metric>`` go to TensorBoard.
    """

    enable: bool = False
    """Evaluate while training."""

    freq: int = 1000
    """Evaluate every this many steps (and after the last step)."""

    tasks: list[str] = field(default_factory=list)
    """lm-eval task or group names, e.g. "ja_leaderboard_jcommonsenseqa", "hellaswag"."""

    include_path: str = ""
    """A folder of extra lm-eval task YAML files (your own tasks)."""

    num_fewshot: int = -1
    """Few-shot examples for every task; -1 keeps each task's own setting."""

    limit: float = 0.0
    """Examples per task: 0 = all, >= 1 a count, below 1 a fraction."""

    batch_size: int = 8
    """Sequences per forward pass on each data-parallel rank."""

    max_gen_toks: int = 256
    """Most tokens generated per answer, for tasks that do not set their own."""


@dataclass
class Moe:
    """``[moe]``: Mixture-of-Experts training (the Qwen3 MoE flavors; ignored by dense ones).

    The default keeps the objective Qwen3-MoE was released with: its auxiliary
    load-balancing loss with HF's ``router_aux_loss_coef`` (0.001). torchtitan's
    auxiliary-loss-free balancing instead routes with a per-expert bias that
    Hugging Face's Qwen3-MoE has no place for: an export drops it, so the
    exported model would route differently from the trained one.
    """

    load_balance: Literal["aux_loss", "aux_loss_free", "none"] = "aux_loss"
    """"aux_loss": add ``aux_loss_coef`` x the Switch-style balance loss per MoE
    layer (as HF's Qwen3-MoE computes it) to the training loss. "aux_loss_free":
    torchtitan's expert bias, moved by ``bias_update_rate`` before each optimizer
    step toward equal load. "none": neither."""

    aux_loss_coef: float = 0.001
    """HF ``router_aux_loss_coef``; Qwen3-30B-A3B's value is 0.001."""

    bias_update_rate: float = 0.001
    """torchtitan's ``load_balance_coeff``: the step of the expert-bias update."""

    grouped_mm: bool = True
    """Run the experts with ``torch._grouped_mm`` on GPU (bf16); on CPU, and when
    false, torchtitan's per-expert loop runs instead."""


@dataclass
class JobConfig:
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    kernels: Kernels = field(default_factory=Kernels)
    hf: HF = field(default_factory=HF)
    validation: Validation = field(default_factory=Validation)
    guard: Guard = field(default_factory=Guard)
    averaging: Averaging = field(default_factory=Averaging)
    debug: Debug = field(default_factory=Debug)
    eval: Eval = field(default_factory=Eval)
    moe: Moe = field(default_factory=Moe)
