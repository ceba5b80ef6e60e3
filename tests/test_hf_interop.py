"""HF import and export in one process: exactness against transformers, folder layout, errors."""

from __future__ import annotations

import subprocess
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchtitan.models.llama3.model.model import Transformer

from support import TINY_TOKENIZER
from support.hf import (
    ODD_CONFIG,
    as_transformers4_config,
    assert_loads_cleanly_in_transformers,
    assert_same_logits,
    assert_same_tensors,
    drop_tensor,
    logits_tolerance,
    safetensors_of,
    save_random_llama,
    token_ids,
    transformers4_python,
    transformers_logits,
)
from swallow_titan.hf import export as hf_export
from swallow_titan.hf.atomic import OutputFolderError
from swallow_titan.checkpoint.dcp_reader import DCPCheckpoint
from swallow_titan.hf.config import model_args_from_hf_config, read_hf_config
from swallow_titan.hf.export import export_hf, parse_size, plan_shards
from swallow_titan.hf.convert import convert_hf_to_dcp
from swallow_titan.hf.weights import HFWeightsError, load_hf_weights
from swallow_titan.hf.run_record import RunRecordError

transformers = pytest.importorskip("transformers")

SEQ_LEN = 48


def our_model(hf_dir: Path) -> Transformer:
    """torchtitan's Llama with the dimensions of an HF folder's config.json, on CPU in fp32."""
    args = model_args_from_hf_config(read_hf_config(hf_dir), "config.json")
    model = Transformer(replace(args, max_seq_len=SEQ_LEN))
    return model.eval()


@pytest.fixture(scope="module")
def hf_fp32(tmp_path_factory) -> Path:
    """A random GQA Llama with llama3 RoPE scaling and untied embeddings, in several shards."""
    return save_random_llama(tmp_path_factory.mktemp("hf") / "odd", ODD_CONFIG)


@pytest.fixture(scope="module")
def dcp_fp32(hf_fp32, tmp_path_factory) -> Path:
    return convert_hf_to_dcp(hf_fp32, tmp_path_factory.mktemp("dcp") / "converted")


@pytest.fixture(scope="module")
def export_fp32(dcp_fp32, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    export_hf(dcp_fp32, out, dtype="float32", max_shard_size="100KB")
    return out


def test_the_test_model_has_gqa_llama3_scaling_untied_embeddings_and_shards(hf_fp32):
    config = read_hf_config(hf_fp32)
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["rope_parameters"]["rope_type"] == "llama3"
    assert config["tie_word_embeddings"] is False
    assert len(list(hf_fp32.glob("model-*.safetensors"))) > 1


def test_logits_after_hf_to_dcp_equal_transformers(hf_fp32, dcp_fp32):
    model = our_model(hf_fp32)
    names = list(model.state_dict())
    model.load_state_dict(DCPCheckpoint(dcp_fp32).read_tensors(names))
    ids = token_ids(ODD_CONFIG["vocab_size"], SEQ_LEN)
    with torch.no_grad():
        ours = model(ids)
    assert_same_logits(ours, transformers_logits(hf_fp32, ids))


def test_logits_after_the_training_time_hf_load_equal_transformers(hf_fp32):
    model = our_model(hf_fp32)
    load_hf_weights([model], hf_fp32, model.model_args)
    ids = token_ids(ODD_CONFIG["vocab_size"], SEQ_LEN)
    with torch.no_grad():
        ours = model(ids)
    assert_same_logits(ours, transformers_logits(hf_fp32, ids))


def test_the_logits_tolerance_catches_a_doubled_rope_scaling_factor(hf_fp32):
    model = our_model(hf_fp32)
    args = model.model_args
    scaling = replace(args.rope_scaling_args, scaling_factor=2 * args.rope_scaling_args.scaling_factor)
    wrong = Transformer(replace(args, rope_scaling_args=scaling, max_seq_len=SEQ_LEN)).eval()
    load_hf_weights([wrong], hf_fp32, wrong.model_args)
    ids = token_ids(ODD_CONFIG["vocab_size"], SEQ_LEN)
    theirs = transformers_logits(hf_fp32, ids)
    with torch.no_grad():
        difference = (wrong(ids) - theirs).abs().max().item()
    assert difference > 4 * logits_tolerance(theirs)


def test_hub_spelling_of_config_json_imports_to_the_same_logits(tmp_path):
    # rope_theta + rope_scaling, as in the Hub's Llama-3.1 files (transformers 4).
    source = save_random_llama(tmp_path / "hf", ODD_CONFIG, tokenizer=None)
    as_transformers4_config(source)
    assert "rope_parameters" not in read_hf_config(source)
    model = our_model(source)
    load_hf_weights([model], source, model.model_args)
    ids = token_ids(ODD_CONFIG["vocab_size"], SEQ_LEN)
    with torch.no_grad():
        ours = model(ids)
    assert_same_logits(ours, transformers_logits(source, ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hf_to_dcp_to_hf_gives_bit_identical_tensors(tmp_path, dtype):
    name = str(dtype).removeprefix("torch.")
    source = save_random_llama(tmp_path / "hf", ODD_CONFIG, dtype=dtype)
    converted = convert_hf_to_dcp(source, tmp_path / "dcp")
    exported = export_hf(converted, tmp_path / "back", dtype=name).folder
    assert_same_tensors(source, exported, dtype=dtype)


def test_export_loads_in_transformers_with_no_missing_or_unexpected_keys(export_fp32):
    assert_loads_cleanly_in_transformers(export_fp32)


def test_export_gives_the_logits_of_the_model_it_came_from(hf_fp32, export_fp32):
    ids = token_ids(ODD_CONFIG["vocab_size"], SEQ_LEN)
    # Bit-identical fp32 weights through the same transformers code: equal logits.
    assert torch.equal(transformers_logits(export_fp32, ids), transformers_logits(hf_fp32, ids))


def test_export_index_lists_every_tensor_in_the_shard_that_holds_it(export_fp32):
    index = json.loads((export_fp32 / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in export_fp32.glob("*.safetensors"))
    assert len(shards) > 1
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    assert sorted(set(index["weight_map"].values())) == shards
    total = 0
    for shard in shards:
        with safe_open(str(export_fp32 / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            keys = set(f.keys())
            total += sum(f.get_tensor(k).numel() * 4 for k in keys)
        assert keys == {k for k, v in index["weight_map"].items() if v == shard}
    assert index["metadata"]["total_size"] == total


def test_export_shards_respect_the_max_shard_size(export_fp32):
    # 100KB, except a single tensor larger than that (the embedding) alone in its shard.
    for shard in export_fp32.glob("*.safetensors"):
        tensors = load_file(shard)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert nbytes <= 100_000 or len(tensors) == 1


def test_export_config_has_llama3_rope_in_both_spellings_dtype_and_token_ids(export_fp32):
    config = json.loads((export_fp32 / "config.json").read_text())
    rope = ODD_CONFIG["rope_parameters"]
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == rope["rope_theta"]
    assert config["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert config["rope_parameters"] == rope
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    generation = json.loads((export_fp32 / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_export_ships_the_tokenizer_files(export_fp32):
    assert (export_fp32 / "tokenizer.model").read_bytes() == TINY_TOKENIZER.read_bytes()


def test_converted_checkpoint_model_card_says_it_was_not_trained_here(export_fp32):
    card = (export_fp32 / "README.md").read_text()
    assert "library_name: transformers" in card
    assert "converted, not trained here" in card
    assert "Final training loss: not recorded" in card


def test_missing_tensor_is_named(tmp_path):
    source = save_random_llama(tmp_path / "hf", ODD_CONFIG, max_shard_size="10GB", tokenizer=None)
    drop_tensor(source, "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(HFWeightsError, match=r"1 tensors the model needs are missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        convert_hf_to_dcp(source, tmp_path / "dcp")
    assert not (tmp_path / "dcp").exists()


def test_unexpected_tensor_is_named(tmp_path):
    source = save_random_llama(tmp_path / "hf", ODD_CONFIG, max_shard_size="10GB", tokenizer=None)
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFWeightsError, match=r"unexpected\): model\.layers\.2\.self_attn\.q_proj\.weight"):
        convert_hf_to_dcp(source, tmp_path / "dcp")


def test_index_naming_an_absent_shard_is_an_error(tmp_path):
    source = save_random_llama(tmp_path / "hf", ODD_CONFIG, tokenizer=None)
    next(source.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(HFWeightsError, match=r"model\.safetensors\.index\.json: names files that are not in"):
        convert_hf_to_dcp(source, tmp_path / "dcp")


def test_a_failed_export_leaves_no_folder_behind(dcp_fp32, tmp_path, monkeypatch):
    written = []

    def fail_on_second_shard(tensors, path, metadata=None):
        if written:
            raise OSError("disk full")
        written.append(path)
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf_export, "save_file", fail_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        export_hf(dcp_fp32, tmp_path / "out", max_shard_size="100KB")
    assert list(tmp_path.iterdir()) == []


def test_export_does_not_replace_an_existing_folder_unless_asked(dcp_fp32, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="exists and is not empty"):
        export_hf(dcp_fp32, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_hf(dcp_fp32, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_export_of_a_checkpoint_without_run_record_says_what_is_missing(dcp_fp32, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in dcp_fp32.iterdir():
        if f.name != "swallow_run.json":
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RunRecordError, match="no swallow_run.json"):
        export_hf(bare, tmp_path / "out")


@pytest.mark.parametrize(
    "text, size", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("100KB", 100_000), ("1000", 1000)]
)
def test_shard_sizes_read_like_transformers(text, size):
    assert parse_size(text) == size


def test_shards_fill_in_order_and_a_large_tensor_stands_alone():
    sizes = [("a", 40), ("b", 40), ("c", 40), ("big", 500), ("d", 10)]
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["big"], ["d"]]


TRANSFORMERS4_LOAD = """
import io, logging, sys, torch, transformers
from transformers import AutoModelForCausalLM
assert transformers.__version__.startswith("4."), transformers.__version__
assert "torch" in sys.modules and transformers.utils.is_torch_available()
log = io.StringIO()
handler = logging.StreamHandler(log)
handler.setLevel(logging.WARNING)
logging.getLogger("transformers").addHandler(handler)
model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)
assert not any(info.values()), info
assert log.getvalue() == "", log.getvalue()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model.eval()(ids).logits, sys.argv[3])
"""


def test_transformers4_loads_the_export_with_the_same_logits(export_fp32, tmp_path):
    ids = token_ids(ODD_CONFIG["vocab_size"], SEQ_LEN)
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run(
        [transformers4_python(), "-c", TRANSFORMERS4_LOAD,
         str(export_fp32), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits4 = torch.load(tmp_path / "logits.pt")
    # transformers 4 and 5 implement the same Llama in fp32 from the same weights.
    assert_same_logits(logits4, transformers_logits(export_fp32, ids))


def test_a_tensor_that_exactly_fills_a_shard_does_not_open_a_new_one():
    assert plan_shards([("a", 50), ("b", 50), ("c", 1)], 100) == [["a", "b"], ["c"]]


def test_bf16_export_is_the_fp32_weights_rounded_and_its_index_counts_bf16_bytes(
    dcp_fp32, export_fp32, tmp_path
):
    out = tmp_path / "bf16"
    result = export_hf(dcp_fp32, out, dtype="bfloat16", max_shard_size="100KB")
    fp32, bf16 = safetensors_of(export_fp32), safetensors_of(out)
    assert fp32.keys() == bf16.keys()
    for name, tensor in bf16.items():
        assert fp32[name].dtype == torch.float32 and tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, fp32[name].to(torch.bfloat16)), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = sum(t.numel() * t.element_size() for t in bf16.values())
    assert index["metadata"]["total_size"] == result.total_bytes == stored
    fp32_index = json.loads((export_fp32 / "model.safetensors.index.json").read_text())
    assert fp32_index["metadata"]["total_size"] == 2 * stored
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_an_export_dtype_other_than_bf16_or_fp32_is_refused_before_writing(dcp_fp32, tmp_path):
    with pytest.raises(hf_export.ExportError, match=r"'float16'.*\['bfloat16', 'float32'\]"):
        export_hf(dcp_fp32, tmp_path / "fp16", dtype="float16")
    assert not (tmp_path / "fp16").exists()
