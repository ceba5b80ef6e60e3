"""config.json <-> model arguments: both RoPE spellings, any Llama shape, clear mismatches."""

from __future__ import annotations

import copy
import json

import pytest

from swallow_titan.hf.config import (
    HFConfigError,
    check_hf_config_matches_flavor,
    ffn_hidden_dim,
    hf_config_from_model_args,
    model_args_from_hf_config,
)
from swallow_titan.model.args import FLAVORS

# Published Llama-3.1-8B config.json values (Hub, transformers 4 spelling).
LLAMA31_8B_HUB = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
}


# Published Llama-3.3-70B-Instruct config.json values (Hub).
LLAMA33_70B_HUB = {
    **LLAMA31_8B_HUB,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}


def transformers5_spelling(config: dict) -> dict:
    config = copy.deepcopy(config)
    rope = config.pop("rope_scaling")
    config["rope_parameters"] = {**rope, "rope_theta": config.pop("rope_theta")}
    return config


def assert_config_is_flavor(config: dict, flavor: str) -> None:
    args = model_args_from_hf_config(config, "config.json")
    ours = FLAVORS[flavor]
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size) == (
        ours.dim, ours.n_layers, ours.n_heads, ours.n_kv_heads, ours.vocab_size
    )
    assert ffn_hidden_dim(args) == ffn_hidden_dim(ours) == config["intermediate_size"]
    assert args.rope_theta == ours.rope_theta
    assert args.rope_scaling_args == ours.rope_scaling_args
    assert args.norm_eps == ours.norm_eps


def test_hub_llama31_8b_config_is_the_8B_flavor():
    assert_config_is_flavor(LLAMA31_8B_HUB, "8B")


def test_hub_llama33_70b_config_is_the_70B_flavor():
    assert_config_is_flavor(LLAMA33_70B_HUB, "70B")
    assert_config_is_flavor(transformers5_spelling(LLAMA33_70B_HUB), "70B")


def test_transformers5_spelling_of_llama31_8b_is_the_8B_flavor():
    assert_config_is_flavor(transformers5_spelling(LLAMA31_8B_HUB), "8B")


@pytest.mark.parametrize(
    "dim, heads, kv_heads, intermediate",
    [(8192, 64, 8, 28672), (2048, 32, 8, 8192), (64, 4, 2, 176), (96, 3, 1, 100), (128, 4, 4, 1000)],
)
def test_any_llama_shape_maps_to_model_args_with_its_exact_sizes(dim, heads, kv_heads, intermediate):
    config = {
        **LLAMA31_8B_HUB,
        "hidden_size": dim,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
    }
    args = model_args_from_hf_config(config, "config.json")
    assert ffn_hidden_dim(args) == intermediate
    assert (args.dim, args.n_heads, args.n_kv_heads) == (dim, heads, kv_heads)


def test_written_config_reads_back_to_the_same_model_args():
    args = FLAVORS["8B"]
    written = hf_config_from_model_args(args, bos_token_id=128000, eos_token_id=128001)
    again = model_args_from_hf_config(json.loads(json.dumps(written)), "config.json")
    assert hf_config_from_model_args(again, bos_token_id=128000, eos_token_id=128001) == written


def test_written_config_carries_rope_in_both_spellings():
    written = hf_config_from_model_args(FLAVORS["8B"], bos_token_id=1, eos_token_id=2)
    assert written["rope_theta"] == 500000.0
    assert written["rope_scaling"] == LLAMA31_8B_HUB["rope_scaling"]
    assert written["rope_parameters"] == {**LLAMA31_8B_HUB["rope_scaling"], "rope_theta": 500000.0}


def test_config_without_rope_scaling_round_trips_without_scaling():
    config = {**LLAMA31_8B_HUB, "rope_scaling": None}
    args = model_args_from_hf_config(config, "config.json")
    written = hf_config_from_model_args(args, bos_token_id=1, eos_token_id=2)
    assert written["rope_scaling"] is None
    assert written["rope_parameters"] == {"rope_theta": 500000.0, "rope_type": "default"}


def test_disagreeing_rope_spellings_are_an_error():
    config = {**LLAMA31_8B_HUB, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
              "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}}
    with pytest.raises(HFConfigError, match="rope_scaling = .*factor=8.0.* but rope_parameters = .*factor=32.0"):
        model_args_from_hf_config(config, "x/config.json")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tie_word_embeddings": True}, "tie_word_embeddings = true is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type: 'yarn' is not supported"),
        ({"attention_bias": True}, "attention_bias = true"),
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "expected a Llama model"),
        ({"head_dim": 64}, "head_dim = 64"),
        ({"hidden_size": None}, "hidden_size: missing"),
    ],
)
def test_configs_the_model_cannot_represent_are_named(change, message):
    config = {**LLAMA31_8B_HUB, **change}
    with pytest.raises(HFConfigError, match=message) as error:
        model_args_from_hf_config(config, "base/config.json")
    assert str(error.value).startswith("base/config.json: ")


def test_mismatch_with_the_flavor_names_field_file_and_both_values(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({**LLAMA31_8B_HUB, "num_key_value_heads": 4, "vocab_size": 128000})
    )
    with pytest.raises(HFConfigError) as error:
        check_hf_config_matches_flavor(tmp_path, FLAVORS["8B"], "8B")
    message = str(error.value)
    assert f"{tmp_path / 'config.json'}: num_key_value_heads = 4, but flavor '8B' has 8" in message
    assert "vocab_size = 128000, but flavor '8B' has 128256" in message


def test_rope_scaling_mismatch_with_the_flavor_is_named(tmp_path):
    scaling = {**LLAMA31_8B_HUB["rope_scaling"], "original_max_position_embeddings": 4096}
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA31_8B_HUB, "rope_scaling": scaling}))
    with pytest.raises(HFConfigError, match="rope_scaling.original_max_position_embeddings = 4096, but flavor '8B' has 8192"):
        check_hf_config_matches_flavor(tmp_path, FLAVORS["8B"], "8B")


def test_missing_config_json_is_named(tmp_path):
    with pytest.raises(HFConfigError, match=f"{tmp_path / 'config.json'}: not found"):
        check_hf_config_matches_flavor(tmp_path, FLAVORS["8B"], "8B")
