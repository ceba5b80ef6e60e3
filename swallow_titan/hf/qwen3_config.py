"""Hugging Face ``config.json`` of Qwen3 models (``qwen3``, ``qwen3_moe``), to and from model arguments.

Every field that defines the weights or the maths maps to torchtitan's
``Qwen3ModelArgs``: ``head_dim`` (decoupled from hidden / heads), the q/k
RMSNorm (always present in Qwen3), ``rope_theta`` (no RoPE scaling),
``tie_word_embeddings``; for MoE ``num_experts``, ``num_experts_per_tok``,
``moe_intermediate_size`` and ``norm_topk_prob``. A setting torchtitan's model
cannot represent (sliding-window attention, attention biases, RoPE scaling,
dense layers among MoE ones via ``decoder_sparse_step`` / ``mlp_only_layers``)
is refused naming the field. ``router_aux_loss_coef`` is a training setting,
not part of the model: it is read into the arguments (the ``[moe]`` section
decides whether training uses it) and written back.
"""

from __future__ import annotations

import json
from typing import Any

from torchtitan.models.moe import MoEArgs

from swallow_titan.hf.config import HFConfigError, attention_shape, require_field, rope_settings
from swallow_titan.model.qwen3 import GROUPED_MM_AVAILABLE, SwallowQwen3ModelArgs

DENSE_MODEL_TYPE = "qwen3"
MOE_MODEL_TYPE = "qwen3_moe"
ARCHITECTURES = {DENSE_MODEL_TYPE: "Qwen3ForCausalLM", MOE_MODEL_TYPE: "Qwen3MoeForCausalLM"}
# Qwen3's base models: <|endoftext|> is both BOS (unused) and EOS.
QWEN3_DEFAULT_AUX_LOSS_COEF = 0.001

# The config.json fields that define the weights and the maths; an imported
# folder must agree with the flavor on all of them.
DENSE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
)
MOE_FIELDS = (
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
)


def is_qwen3_config(config: dict[str, Any]) -> bool:
    """Whether a config.json describes a Qwen3 (dense or MoE) model."""
    architectures = config.get("architectures") or []
    return config.get("model_type") in ARCHITECTURES or any(
        a in architectures for a in ARCHITECTURES.values()
    )


def _refuse(source: str, key: str, value: Any, needs: str) -> HFConfigError:
    return HFConfigError(
        f"{source}: {key} = {json.dumps(value)} is not supported; torchtitan's Qwen3 "
        f"model needs {needs}"
    )


def _check_representable(config: dict[str, Any], moe: bool, n_layers: int, source: str) -> None:
    for key, allowed in (
        ("hidden_act", "silu"),
        ("attention_bias", False),
        ("use_sliding_window", False),
    ):
        if key in config and config[key] != allowed:
            raise _refuse(source, key, config[key], json.dumps(allowed))
    layer_types = config.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise _refuse(source, "layer_types", layer_types, 'every layer "full_attention"')
    for key in ("rope_scaling", "rope_parameters"):
        entry = config.get(key)
        if isinstance(entry, dict) and entry.get("rope_type", entry.get("type", "default")) != "default":
            raise _refuse(source, f"{key}.rope_type", entry.get("rope_type", entry.get("type")),
                          '"default" (RoPE without scaling)')
    if not moe:
        return
    if config.get("decoder_sparse_step", 1) != 1:
        raise _refuse(source, "decoder_sparse_step", config["decoder_sparse_step"],
                      "1 (every layer MoE)")
    if config.get("mlp_only_layers"):
        raise _refuse(source, "mlp_only_layers", config["mlp_only_layers"],
                      "[] (every layer MoE)")
    if config.get("num_shared_experts"):
        raise _refuse(source, "num_shared_experts", config["num_shared_experts"], "0")


def qwen3_args_from_hf_config(config: dict[str, Any], source: str) -> SwallowQwen3ModelArgs:
    """Model arguments for a ``qwen3`` / ``qwen3_moe`` config.json (any size)."""
    architectures = config.get("architectures") or []
    moe = config.get("model_type") == MOE_MODEL_TYPE or ARCHITECTURES[MOE_MODEL_TYPE] in architectures
    dim, n_layers, n_heads, n_kv_heads = attention_shape(config, source)
    _check_representable(config, moe, n_layers, source)
    head_dim = config.get("head_dim") or dim // n_heads
    theta, scaling = rope_settings(config, source)
    assert scaling is None  # refused above
    args = SwallowQwen3ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        vocab_size=require_field(config, "vocab_size", source),
        hidden_dim=require_field(config, "intermediate_size", source),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        qk_norm=True,
        enable_weight_tying=bool(config.get("tie_word_embeddings", False)),
        max_seq_len=int(config.get("max_position_embeddings") or 4096),
    )
    if moe:
        experts = config.get("num_experts", config.get("num_local_experts"))
        if not isinstance(experts, int) or experts < 1:
            raise HFConfigError(f"{source}: num_experts: expected a positive integer, got {experts!r}")
        top_k = require_field(config, "num_experts_per_tok", source)
        if top_k > experts:
            raise HFConfigError(
                f"{source}: num_experts_per_tok = {top_k} exceeds num_experts = {experts}"
            )
        args.moe_enabled = True
        args.moe_inter_dim = require_field(config, "moe_intermediate_size", source)
        args.moe_args = MoEArgs(
            num_experts=experts,
            num_shared_experts=0,
            top_k=top_k,
            score_func="softmax",
            route_norm=bool(config.get("norm_topk_prob", False)),
            route_scale=1.0,
            score_before_experts=False,
            use_grouped_mm=GROUPED_MM_AVAILABLE,
        )
        args.router_aux_loss_coef = float(
            config.get("router_aux_loss_coef", QWEN3_DEFAULT_AUX_LOSS_COEF)
        )
    return args


def qwen3_hf_fields(
    args: SwallowQwen3ModelArgs, max_position_embeddings: int | None
) -> dict[str, Any]:
    """The ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` fields of a config.json
    (transformers 4.5x and 5.x); :func:`swallow_titan.hf.config.hf_config_from_model_args`
    adds those every family shares.

    RoPE is written in both spellings (``rope_theta`` and ``rope_parameters``).
    """
    if not args.qk_norm:
        raise HFConfigError("Qwen3 model arguments with qk_norm = False have no HF Qwen3 config")
    moe = bool(args.moe_enabled)
    model_type = MOE_MODEL_TYPE if moe else DENSE_MODEL_TYPE
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim,
        "max_position_embeddings": max_position_embeddings or args.max_seq_len,
        "max_window_layers": args.n_layers,
        "rope_scaling": None,
        "rope_parameters": {"rope_theta": float(args.rope_theta), "rope_type": "default"},
        "sliding_window": None,
        "tie_word_embeddings": bool(args.enable_weight_tying),
        "use_sliding_window": False,
    }
    if moe:
        m = args.moe_args
        if m.num_shared_experts or m.score_func != "softmax" or m.score_before_experts or m.route_scale != 1.0:
            raise HFConfigError(
                "these MoE arguments (shared experts, sigmoid scores, scores before the "
                "experts or a route scale) have no HF Qwen3-MoE config"
            )
        config.update(
            {
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "moe_intermediate_size": args.moe_inter_dim,
                "norm_topk_prob": bool(m.route_norm),
                "num_experts": m.num_experts,
                "num_experts_per_tok": m.top_k,
                "output_router_logits": False,
                "router_aux_loss_coef": args.router_aux_loss_coef or QWEN3_DEFAULT_AUX_LOSS_COEF,
            }
        )
    return config


def qwen3_model_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The fields two Qwen3 configs must agree on, from a config this module wrote."""
    keys = DENSE_FIELDS + (MOE_FIELDS if config.get("model_type") == MOE_MODEL_TYPE else ())
    return {"model_type": config.get("model_type"), **{k: config.get(k) for k in keys}}
