"""Qwen3 (dense and MoE) Hugging Face interop in one process: config mapping, logits, round trips.

The HF side is transformers' own ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM``
with random weights (norm weights randomised too, see ``save_random_qwen3``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from support.hf import (
    QWEN3_MOE_TINY_CONFIG,
    QWEN3_TINY_CONFIG,
    assert_loads_cleanly_in_transformers,
    assert_same_logits,
    assert_same_tensors,
    logits_tolerance,
    safetensors_of,
    save_random_qwen3,
    token_ids,
    transformers_logits,
)
from swallow_titan.checkpoint.dcp_reader import DCPCheckpoint
from swallow_titan.hf.config import (
    HFConfigError,
    check_hf_config_matches_flavor,
    hf_config_from_model_args,
    model_args_from_hf_config,
    read_hf_config,
)
from swallow_titan.hf.convert import convert_hf_to_dcp
from swallow_titan.hf.export import export_hf
from swallow_titan.hf.weights import load_hf_weights
from swallow_titan.model.family import QWEN3
from swallow_titan.model.qwen3 import QWEN3_FLAVORS

transformers = pytest.importorskip("transformers")

SEQ_LEN = 48

# Published config.json of Qwen/Qwen3-8B-Base (transformers 4.51 spelling).
QWEN3_8B_HUB = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 32768,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
# Published config.json of Qwen/Qwen3-30B-A3B-Base (the MoE fields).
QWEN3_30B_A3B_HUB = {
    **QWEN3_8B_HUB,
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "max_window_layers": 48,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}
# Qwen/Qwen3-0.6B-Base: the small models tie their embeddings.
QWEN3_06B_HUB = {
    **QWEN3_8B_HUB,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "max_window_layers": 28,
    "tie_word_embeddings": True,
}


def our_model(hf_dir: Path, **changes) -> torch.nn.Module:
    """torchtitan's Qwen3 with the dimensions of an HF folder's config.json, fp32, HF weights."""
    args = model_args_from_hf_config(read_hf_config(hf_dir), "config.json")
    model = QWEN3.model_cls(replace(args, max_seq_len=SEQ_LEN, **changes)).eval()
    load_hf_weights([model], hf_dir, model.model_args)
    return model


@pytest.fixture(scope="module")
def hf_dense(tmp_path_factory) -> Path:
    return save_random_qwen3(tmp_path_factory.mktemp("hf") / "dense", QWEN3_TINY_CONFIG)


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory) -> Path:
    return save_random_qwen3(tmp_path_factory.mktemp("hf") / "moe", QWEN3_MOE_TINY_CONFIG)


# ------------------------------------------------------------------ config.json


@pytest.mark.parametrize(
    "hub, flavor", [(QWEN3_8B_HUB, "8B"), (QWEN3_06B_HUB, "0.6B"), (QWEN3_30B_A3B_HUB, "30B-A3B")]
)
def test_hub_qwen3_configs_are_torchtitans_flavors(tmp_path, hub, flavor):
    (tmp_path / "config.json").write_text(json.dumps(hub))
    check_hf_config_matches_flavor(tmp_path, QWEN3_FLAVORS[flavor], flavor)
    args = model_args_from_hf_config(hub, "config.json")
    assert args.head_dim == 128 and args.qk_norm and args.rope_theta == 1e6
    assert args.enable_weight_tying == hub["tie_word_embeddings"]


def test_moe_fields_map_to_torchtitans_moe_arguments():
    args = model_args_from_hf_config(QWEN3_30B_A3B_HUB, "config.json")
    moe = args.moe_args
    assert args.moe_enabled and args.moe_inter_dim == 768
    assert (moe.num_experts, moe.top_k, moe.route_norm, moe.score_func) == (128, 8, True, "softmax")
    assert not moe.score_before_experts and moe.num_shared_experts == 0
    assert args.router_aux_loss_coef == 0.001


@pytest.mark.parametrize("hub", [QWEN3_8B_HUB, QWEN3_06B_HUB, QWEN3_30B_A3B_HUB])
def test_written_config_reads_back_to_the_same_arguments(hub):
    args = model_args_from_hf_config(hub, "config.json")
    written = hf_config_from_model_args(args, bos_token_id=151643, eos_token_id=151643)
    assert written["model_type"] == hub["model_type"]
    for key, value in hub.items():
        if key not in ("torch_dtype", "max_window_layers"):
            assert written[key] == value, key
    again = model_args_from_hf_config(written, "config.json")
    assert hf_config_from_model_args(again, bos_token_id=151643, eos_token_id=151643) == written


def test_a_qwen3_folder_against_a_llama_flavor_names_the_model_type(tmp_path):
    from swallow_titan.model.args import FLAVORS

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_8B_HUB))
    with pytest.raises(HFConfigError, match="model_type = \"qwen3\", but flavor '8B' has \"llama\""):
        check_hf_config_matches_flavor(tmp_path, FLAVORS["8B"], "8B")


def test_a_different_head_dim_is_a_named_mismatch(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**QWEN3_8B_HUB, "head_dim": 64}))
    with pytest.raises(HFConfigError, match="head_dim = 64, but flavor '8B' has 128"):
        check_hf_config_matches_flavor(tmp_path, QWEN3_FLAVORS["8B"], "8B")


@pytest.mark.parametrize(
    "hub, change, field",
    [
        (QWEN3_8B_HUB, {"use_sliding_window": True}, "use_sliding_window"),
        (QWEN3_8B_HUB, {"attention_bias": True}, "attention_bias"),
        (QWEN3_8B_HUB, {"hidden_act": "gelu"}, "hidden_act"),
        (QWEN3_8B_HUB, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
        (QWEN3_8B_HUB, {"layer_types": ["sliding_attention"] * 36}, "layer_types"),
        (QWEN3_30B_A3B_HUB, {"decoder_sparse_step": 2}, "decoder_sparse_step"),
        (QWEN3_30B_A3B_HUB, {"mlp_only_layers": [0]}, "mlp_only_layers"),
    ],
)
def test_a_config_the_model_cannot_represent_is_refused_naming_the_field(hub, change, field):
    with pytest.raises(HFConfigError, match=rf"config\.json: {field} = .* is not supported"):
        model_args_from_hf_config({**hub, **change}, "config.json")


# ------------------------------------------------------------------ weights


def test_the_test_model_decouples_head_dim_ties_embeddings_and_shards(hf_dense):
    config = read_hf_config(hf_dense)
    assert config["head_dim"] * config["num_attention_heads"] != config["hidden_size"]
    assert config["tie_word_embeddings"] is True
    assert len(list(hf_dense.glob("model-*.safetensors"))) > 1
    assert "lm_head.weight" not in safetensors_of(hf_dense)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_logits_after_the_training_time_hf_load_equal_transformers(kind, hf_dense, hf_moe):
    folder = hf_dense if kind == "dense" else hf_moe
    ids = token_ids(QWEN3_TINY_CONFIG["vocab_size"], SEQ_LEN)
    with torch.no_grad():
        ours = our_model(folder)(ids)
    assert_same_logits(ours, transformers_logits(folder, ids))


@pytest.mark.parametrize("wrong", ["rope_theta", "norm_eps"])
def test_the_logits_tolerance_catches_a_wrongly_mapped_field(hf_dense, wrong):
    # theta 1e6 -> 1e4 and eps 1e-6 -> 1e-2: what a dropped or swapped field gives.
    changes = {"rope_theta": 1e4} if wrong == "rope_theta" else {"norm_eps": 1e-2}
    ids = token_ids(QWEN3_TINY_CONFIG["vocab_size"], SEQ_LEN)
    theirs = transformers_logits(hf_dense, ids)
    with torch.no_grad():
        difference = (our_model(hf_dense, **changes)(ids) - theirs).abs().max().item()
    assert difference > 4 * logits_tolerance(theirs)


def test_the_logits_tolerance_catches_swapped_q_and_k_norms(hf_dense):
    ids = token_ids(QWEN3_TINY_CONFIG["vocab_size"], SEQ_LEN)
    theirs = transformers_logits(hf_dense, ids)
    model = our_model(hf_dense)
    with torch.no_grad():
        for block in model.layers.values():
            q, k = block.attention.q_norm.weight, block.attention.k_norm.weight
            q_copy = q.clone()
            q.copy_(k)
            k.copy_(q_copy)
        difference = (model(ids) - theirs).abs().max().item()
    assert difference > 4 * logits_tolerance(theirs)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_logits_after_hf_to_dcp_equal_transformers(kind, hf_dense, hf_moe, tmp_path):
    folder = hf_dense if kind == "dense" else hf_moe
    converted = convert_hf_to_dcp(folder, tmp_path / "dcp")
    args = model_args_from_hf_config(read_hf_config(folder), "config.json")
    model = QWEN3.model_cls(replace(args, max_seq_len=SEQ_LEN)).eval()
    model.load_state_dict(DCPCheckpoint(converted).read_tensors(list(model.state_dict())))
    ids = token_ids(QWEN3_TINY_CONFIG["vocab_size"], SEQ_LEN)
    with torch.no_grad():
        ours = model(ids)
    assert_same_logits(ours, transformers_logits(folder, ids))


@pytest.mark.parametrize(
    "kind, dtype", [("dense", torch.bfloat16), ("dense", torch.float32), ("moe", torch.bfloat16)]
)
def test_hf_to_dcp_to_hf_gives_bit_identical_tensors(tmp_path, kind, dtype):
    config = QWEN3_TINY_CONFIG if kind == "dense" else QWEN3_MOE_TINY_CONFIG
    source = save_random_qwen3(tmp_path / "hf", config, dtype=dtype)
    converted = convert_hf_to_dcp(source, tmp_path / "dcp")
    exported = export_hf(converted, tmp_path / "back", dtype=str(dtype).removeprefix("torch.")).folder
    assert_same_tensors(source, exported, dtype=dtype)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_export_loads_in_transformers_with_no_missing_or_unexpected_keys(kind, hf_dense, hf_moe, tmp_path):
    folder = hf_dense if kind == "dense" else hf_moe
    exported = export_hf(convert_hf_to_dcp(folder, tmp_path / "dcp"), tmp_path / "out",
                         dtype="float32").folder
    config = read_hf_config(exported)
    assert config["architectures"] == read_hf_config(folder)["architectures"]
    assert_loads_cleanly_in_transformers(exported)
    ids = token_ids(QWEN3_TINY_CONFIG["vocab_size"], SEQ_LEN)
    assert torch.equal(transformers_logits(exported, ids), transformers_logits(folder, ids))
