"""Hugging Face ``config.json``, to and from model arguments, for every model family.

The functions here dispatch on the family: a config.json by its
``model_type`` / ``architectures`` (``qwen3`` / ``qwen3_moe``:
:mod:`swallow_titan.hf.qwen3_config`; ``llama``: here), model arguments by
their class (:func:`swallow_titan.model.family.family_of_args`). The rest of
this module is the Llama mapping.

Reading accepts both spellings of RoPE settings in use: ``rope_theta`` +
``rope_scaling`` (the Hub's Llama-3.1 files, transformers 4) and
``rope_parameters`` (what transformers 5 writes). Writing puts both, so
transformers 4.4x and 5.x read the same RoPE.

torchtitan's llama3 model always applies llama3 RoPE scaling; a config without
scaling maps to scaling factor 1 (which leaves the frequencies as they are)
and back.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torchtitan.models.llama3.model.args import RoPEScalingArgs
from torchtitan.models.llama3.model.model import TransformerBlock

from swallow_titan.model.args import SwallowModelArgs

CONFIG_FILE = "config.json"
ARCHITECTURE = "LlamaForCausalLM"
HF_DEFAULT_ROPE_THETA = 10_000.0  # transformers' default when a file names none

# The config.json fields that define the weights and the maths of the model;
# an imported folder must agree with the flavor on all of them.
MODEL_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling.factor",
    "rope_scaling.low_freq_factor",
    "rope_scaling.high_freq_factor",
    "rope_scaling.original_max_position_embeddings",
    "tie_word_embeddings",
)

_LLAMA3_SCALING_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


class HFConfigError(ValueError):
    """A config.json that swallow-titan cannot use, phrased for its owner."""


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF model folder."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise HFConfigError(
            f"{path}: not found; a Hugging Face model folder must hold config.json "
            "next to its *.safetensors files"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise HFConfigError(f"{path}: expected a JSON object at the top level")
    return config


def rope_settings(config: dict[str, Any], source: str) -> tuple[float, RoPEScalingArgs | None]:
    """RoPE theta and llama3 scaling (None: no scaling), from either spelling.

    Where both spellings are present they must agree.
    """
    params = config.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise HFConfigError(f"{source}: rope_parameters: expected an object, got {params!r}")
    if params is not None and params and all(isinstance(v, dict) for v in params.values()):
        raise HFConfigError(
            f"{source}: rope_parameters: per-layer-type RoPE ({sorted(params)}) is not a "
            "Llama configuration"
        )
    legacy = config.get("rope_scaling")
    if legacy is not None and not isinstance(legacy, dict):
        raise HFConfigError(f"{source}: rope_scaling: expected an object or null, got {legacy!r}")

    thetas = []
    if config.get("rope_theta") is not None:
        thetas.append(("rope_theta", float(config["rope_theta"])))
    if params and params.get("rope_theta") is not None:
        thetas.append(("rope_parameters.rope_theta", float(params["rope_theta"])))
    scalings = []
    if legacy is not None:
        scalings.append(("rope_scaling", _llama3_scaling(legacy, "rope_scaling", source)))
    if params:
        scalings.append(("rope_parameters", _llama3_scaling(params, "rope_parameters", source)))

    for values in (thetas, scalings):
        if len(values) == 2 and values[0][1] != values[1][1]:
            (name_a, a), (name_b, b) = values
            raise HFConfigError(
                f"{source}: {name_a} = {_show(a)} but {name_b} = {_show(b)}; the two "
                "spellings of the RoPE settings must agree (remove one)"
            )
    theta = thetas[0][1] if thetas else HF_DEFAULT_ROPE_THETA
    scaling = scalings[0][1] if scalings else None
    return theta, scaling


def _llama3_scaling(
    entry: dict[str, Any], field: str, source: str
) -> RoPEScalingArgs | None:
    rope_type = entry.get("rope_type", entry.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise HFConfigError(
            f"{source}: {field}.rope_type: {rope_type!r} is not supported; the Llama "
            "model here implements 'llama3' scaling or none ('default')"
        )
    missing = [k for k in _LLAMA3_SCALING_KEYS if entry.get(k) is None]
    if missing:
        raise HFConfigError(
            f"{source}: {field}: llama3 scaling needs {', '.join(missing)}"
        )
    return RoPEScalingArgs(
        scaling_factor=float(entry["factor"]),
        low_freq_factor=float(entry["low_freq_factor"]),
        high_freq_factor=float(entry["high_freq_factor"]),
        original_max_position_embeddings=int(entry["original_max_position_embeddings"]),
    )


def _show(value: Any) -> str:
    if isinstance(value, RoPEScalingArgs):
        return (
            f"llama3(factor={value.scaling_factor}, low_freq_factor={value.low_freq_factor}, "
            f"high_freq_factor={value.high_freq_factor}, original_max_position_embeddings="
            f"{value.original_max_position_embeddings})"
        )
    return "none" if value is None else repr(value)


def ffn_hidden_dim(args: SwallowModelArgs) -> int:
    """The SwiGLU hidden size torchtitan builds for ``args`` (HF intermediate_size)."""
    with torch.device("meta"):
        block = TransformerBlock(0, replace(args, n_layers=1))
    return block.feed_forward.w1.out_features


def _ffn_args(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    """``(multiple_of, ffn_dim_multiplier)`` giving exactly ``intermediate_size``."""
    probe = SwallowModelArgs(dim=dim, n_heads=1, multiple_of=1, ffn_dim_multiplier=None)
    base = ffn_hidden_dim(probe)
    # torchtitan rounds the hidden size up to a multiple of `multiple_of`:
    # with multiple_of = intermediate_size, anything in (0, intermediate_size]
    # rounds to it.
    if base <= intermediate_size:
        return intermediate_size, None
    return intermediate_size, intermediate_size / base


def require_field(config: dict[str, Any], key: str, source: str, kind: type = int) -> Any:
    """``config[key]``, checked to be a positive integer (or a number); errors name the field."""
    value = config.get(key)
    if value is None:
        raise HFConfigError(f"{source}: {key}: missing; the model's config.json must define it")
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise HFConfigError(f"{source}: {key}: expected a positive integer, got {value!r}")
    if kind is float and not isinstance(value, (int, float)):
        raise HFConfigError(f"{source}: {key}: expected a number, got {value!r}")
    return value


def attention_shape(config: dict[str, Any], source: str) -> tuple[int, int, int, int]:
    """``(hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads)``.

    The first three must be positive integers; the KV heads default to the
    attention heads (no GQA) and must divide them. Errors name the field.
    """
    dim = require_field(config, "hidden_size", source)
    n_layers = require_field(config, "num_hidden_layers", source)
    n_heads = require_field(config, "num_attention_heads", source)
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    if n_heads % n_kv_heads:
        raise HFConfigError(
            f"{source}: num_attention_heads = {n_heads} is not a multiple of "
            f"num_key_value_heads = {n_kv_heads}"
        )
    return dim, n_layers, n_heads, n_kv_heads


def model_args_from_hf_config(config: dict[str, Any], source: str) -> Any:
    """Model arguments for a config.json of any family swallow-titan trains.

    ``model_type`` (or ``architectures``) picks the family: ``qwen3`` /
    ``qwen3_moe`` (any size) or ``llama`` (any Llama-architecture size).
    ``source`` names the file in errors. Raises :class:`HFConfigError` for
    another model type or settings the family's torchtitan model cannot
    represent.
    """
    from swallow_titan.hf.qwen3_config import ARCHITECTURES, is_qwen3_config, qwen3_args_from_hf_config

    if is_qwen3_config(config):
        return qwen3_args_from_hf_config(config, source)
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type != "llama" and ARCHITECTURE not in architectures:
        raise HFConfigError(
            f"{source}: model_type = {model_type!r}, architectures = {architectures!r}; "
            f"expected a Llama model (model_type 'llama', {ARCHITECTURE}) or a Qwen3 "
            f"model (model_type {' or '.join(map(repr, ARCHITECTURES))})"
        )
    return _llama_args_from_hf_config(config, source)


def _llama_args_from_hf_config(config: dict[str, Any], source: str) -> SwallowModelArgs:
    """Model arguments for any Llama-architecture config.json.

    Raises :class:`HFConfigError` for settings the torchtitan Llama cannot
    represent (tied embeddings, biases, other activations or RoPE types, a
    head_dim other than hidden/heads).
    """
    dim, n_layers, n_heads, n_kv_heads = attention_shape(config, source)
    vocab_size = require_field(config, "vocab_size", source)
    intermediate_size = require_field(config, "intermediate_size", source)
    norm_eps = float(config.get("rms_norm_eps", 1e-6))
    if dim % n_heads:
        raise HFConfigError(
            f"{source}: hidden_size = {dim} is not divisible by num_attention_heads = {n_heads}"
        )
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != dim // n_heads:
        raise HFConfigError(
            f"{source}: head_dim = {head_dim}, but the model here uses hidden_size / "
            f"num_attention_heads = {dim // n_heads}"
        )
    for key, allowed in (
        ("hidden_act", ("silu",)),
        ("attention_bias", (False,)),
        ("mlp_bias", (False,)),
        ("tie_word_embeddings", (False,)),
        ("pretraining_tp", (1,)),
    ):
        if key in config and config[key] not in allowed:
            raise HFConfigError(
                f"{source}: {key} = {json.dumps(config[key])} is not supported; the "
                f"Llama model here (torchtitan's, untied embeddings, no biases) needs "
                f"{json.dumps(allowed[0])}"
            )
    theta, scaling = rope_settings(config, source)
    multiple_of, multiplier = _ffn_args(dim, intermediate_size)
    args = SwallowModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab_size,
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=norm_eps,
        rope_theta=theta,
        # Factor 1 leaves every frequency as it is: RoPE without scaling.
        rope_scaling_args=scaling or RoPEScalingArgs(scaling_factor=1.0),
    )
    if ffn_hidden_dim(args) != intermediate_size:  # the rounding rule changed
        raise HFConfigError(
            f"{source}: intermediate_size = {intermediate_size} cannot be expressed "
            "with torchtitan's FFN size rule"
        )
    return args


def _rope_scaling_entry(args: SwallowModelArgs) -> dict[str, Any] | None:
    s = args.rope_scaling_args
    if s.scaling_factor == 1.0:
        return None
    return {
        "factor": float(s.scaling_factor),
        "high_freq_factor": float(s.high_freq_factor),
        "low_freq_factor": float(s.low_freq_factor),
        "original_max_position_embeddings": int(s.original_max_position_embeddings),
        "rope_type": "llama3",
    }


def hf_config_from_model_args(
    args: Any,
    *,
    bos_token_id: int | None,
    eos_token_id: int | list[int] | None,
    dtype: str = "bfloat16",
    max_position_embeddings: int | None = None,
) -> dict[str, Any]:
    """A ``config.json`` for the model ``args`` describe (Llama-3.1 or Qwen3), for transformers.

    The family's own fields (:func:`_llama_hf_fields`,
    :func:`swallow_titan.hf.qwen3_config.qwen3_hf_fields`), then those every
    family writes alike from torchtitan's arguments: the dtype as ``dtype`` and
    ``torch_dtype``, the attention shape, RoPE theta, no biases or dropout.
    """
    from swallow_titan.model.family import QWEN3, family_of_args

    if family_of_args(args) is QWEN3:
        from swallow_titan.hf.qwen3_config import qwen3_hf_fields

        family_fields = qwen3_hf_fields(args, max_position_embeddings)
    else:
        family_fields = _llama_hf_fields(args, max_position_embeddings)
    config = {
        **family_fields,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,
        "hidden_act": "silu",
        "hidden_size": args.dim,
        "initializer_range": 0.02,
        "num_attention_heads": args.n_heads,
        "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.n_kv_heads or args.n_heads,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": float(args.rope_theta),
        "use_cache": True,
        "vocab_size": args.vocab_size,
    }
    # Sorted by name, as transformers' save_pretrained writes config.json.
    return dict(sorted(config.items()))


def _llama_hf_fields(
    args: SwallowModelArgs, max_position_embeddings: int | None
) -> dict[str, Any]:
    """The ``LlamaForCausalLM`` fields of a config.json that transformers 4.4x and 5.x load.

    RoPE is written in both spellings (``rope_theta`` + ``rope_scaling`` and
    ``rope_parameters``).
    """
    scaling = _rope_scaling_entry(args)
    if max_position_embeddings is None:
        max_position_embeddings = args.max_seq_len
        if scaling is not None:
            scaled = int(scaling["original_max_position_embeddings"] * scaling["factor"])
            max_position_embeddings = max(max_position_embeddings, scaled)
    rope_parameters = {"rope_theta": float(args.rope_theta), "rope_type": "default"}
    if scaling is not None:
        rope_parameters.update(scaling)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "head_dim": args.dim // args.n_heads,
        "intermediate_size": ffn_hidden_dim(args),
        "max_position_embeddings": max_position_embeddings,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "rope_scaling": scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": False,
    }


def _model_fields(config: dict[str, Any]) -> dict[str, Any]:
    from swallow_titan.hf.qwen3_config import is_qwen3_config, qwen3_model_fields

    if is_qwen3_config(config):
        return qwen3_model_fields(config)
    scaling = config.get("rope_scaling") or {}
    fields = {k: config.get(k) for k in MODEL_FIELDS if "." not in k}
    for key in _LLAMA3_SCALING_KEYS:
        fields[f"rope_scaling.{key}"] = scaling.get(key)
    return fields


def hf_config_mismatches(
    config: dict[str, Any], args: Any, source: str
) -> list[tuple[str, Any, Any]]:
    """``(field, value in config.json, value the flavor needs)`` for each difference.

    Both sides are compared in config.json terms, so RoPE written in either
    spelling compares alike. Raises :class:`HFConfigError` for a config the
    model cannot represent at all.
    """
    theirs = hf_config_from_model_args(
        model_args_from_hf_config(config, source), bos_token_id=None, eos_token_id=None
    )
    ours = hf_config_from_model_args(args, bos_token_id=None, eos_token_id=None)
    a, b = _model_fields(theirs), _model_fields(ours)
    if theirs.get("model_type") != ours.get("model_type"):
        # Another family (or dense vs MoE): the first difference says it all.
        return [("model_type", theirs.get("model_type"), ours.get("model_type"))]
    return [(k, a[k], b[k]) for k in a if a[k] != b[k]]


def check_hf_config_matches_flavor(
    folder: str | Path, args: Any, flavor: str
) -> dict[str, Any]:
    """Read ``folder/config.json`` and raise if it describes another model than ``args``."""
    source = str(Path(folder) / CONFIG_FILE)
    config = read_hf_config(folder)
    mismatches = hf_config_mismatches(config, args, source)
    if mismatches:
        lines = [
            f"{source}: {field} = {json.dumps(theirs)}, but flavor {flavor!r} has "
            f"{json.dumps(ours)}"
            for field, theirs, ours in mismatches
        ]
        raise HFConfigError(
            "\n".join(lines)
            + f"\n(the weights in {folder} are for another model than [model] flavor = "
            f"{flavor!r}; pick the flavor that matches, or another folder)"
        )
    return config
