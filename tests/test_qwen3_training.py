"""Qwen3 dense trains like Llama: HF start, export at the end, FSDP or TP on 2 processes, the same pipeline.

The run is the tiny CPU config with only ``[model] name = "swallow_qwen3"``
changed (and an HF folder of transformers' own random Qwen3 to start from):
data pipeline, validation sets, guard, checkpoints, TensorBoard, export and
model card are the ones Llama runs use.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from support.hf import QWEN3_TINY_CONFIG, assert_same_logits, assert_same_tensors, save_random_qwen3
from support.overrides import FSDP2, KERNELS_ON, TP2
from support.runs import run_training
from swallow_titan.checkpoint.dcp_reader import DCPCheckpoint
from swallow_titan.model.family import QWEN3
from swallow_titan.model.parallelize import CPU_ATTENTION_SHARDING_MESSAGE

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

QWEN3_RUN = ["--model.name", "swallow_qwen3", "--model.flavor", "tiny"]


def hf_run_args(hf_dir: Path) -> list[str]:
    return [
        *QWEN3_RUN,
        "--training.steps", "3",
        "--optimizer.lr", "3e-3",
        "--checkpoint.enable", "true",
        "--hf.load_path", str(hf_dir),
        "--hf.base_model", "Qwen/Qwen3-0.6B-Base",
        "--hf.export_at_end", "true",
        "--hf.export_dtype", "float32",
    ]


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory) -> Path:
    return save_random_qwen3(tmp_path_factory.mktemp("hf") / "qwen3", QWEN3_TINY_CONFIG,
                             max_shard_size="1MB")


@pytest.fixture(scope="module")
def hf_run(hf_tiny, tmp_path_factory):
    dump = tmp_path_factory.mktemp("run") / "out"
    result = run_training(
        dump,
        *hf_run_args(hf_tiny),
        "--metrics.enable_tensorboard", "true",
        "--validation.enable", "true",
        "--validation.freq", "3",
        "--validation.seq_len", "64",
        "--validation.local_batch_size", "4",
    ).check()
    return dump, result


def test_a_qwen3_run_starts_from_hf_weights_and_validates_per_domain(hf_run, hf_tiny):
    dump, result = hf_run
    assert f"loading Hugging Face weights from {hf_tiny}" in result.output
    # 35 HF tensors (3 layers x 11, embedding, final norm) fill 36 model
    # entries: the tied output weight is the embedding.
    assert f"Loaded 36 tensors of Hugging Face weights from {hf_tiny}" in result.output
    assert sorted(result.losses) == [1, 2, 3]
    assert 3 in result.validation_losses
    record = json.loads((dump / "checkpoint" / "swallow_run.json").read_text())
    assert record["hf_config"]["model_type"] == "qwen3"
    assert list((dump / "tb").rglob("events.out.tfevents.*"))


def test_export_at_end_gives_the_logits_of_the_trained_checkpoint(hf_run):
    dump, _ = hf_run
    exported = dump / "hf" / "step-3"
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["tie_word_embeddings"]
    args = replace(QWEN3.flavors["tiny"], max_seq_len=64)
    ours = QWEN3.model_cls(args).eval()
    ours.load_state_dict(DCPCheckpoint(dump / "checkpoint" / "step-3").read_tensors(list(ours.state_dict())))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_same_logits(ours(ids), theirs(ids).logits)
    card = (exported / "README.md").read_text()
    assert "`Qwen3ForCausalLM`" in card and "tied embeddings" in card and "- qwen3" in card


# FSDP over 2 processes (2 ranks x local 4), or TP over 2 with both ranks
# reading the one process's micro-batches (local 4, 2 per step), also with
# [kernels] on (Triton norms, q/k norms on head-sharded DTensors, the fused
# loss on the tied, vocabulary-sharded output; Triton's interpreter); all with
# per-document positions (the tiny config's data.reset_position_ids).
LAYOUTS = {
    "fsdp2": ("Applied FSDP to the model", FSDP2),
    "tp2": ("Tensor Parallelism to the model", TP2),
    "tp2_kernels": ("Triton kernels: rmsnorm = 'triton', loss = 'fused_linear_ce'",
                    [*TP2, *KERNELS_ON]),
}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_process_run_imports_trains_and_exports_like_one_process(layout, hf_run, hf_tiny, tmp_path):
    applied, overrides = LAYOUTS[layout]
    _, single = hf_run
    result = run_training(tmp_path / layout, *hf_run_args(hf_tiny), *overrides, nproc=2,
                          env={"TRITON_INTERPRET": "1"}).check()
    assert applied in result.output
    if layout.startswith("tp2"):
        # Attention ran on head-sharded DTensors, through our CPU flash-attention
        # rule (without it torch refuses the kernel: tests/qwen3_tp_checks.py).
        assert CPU_ATTENTION_SHARDING_MESSAGE in result.output
    # Step 1's loss is the HF model's: the sharded load gives the same model.
    assert result.losses[1] == pytest.approx(single.losses[1], rel=1e-6)
    # Later steps: only the order of the gradient sums differs (as the Llama
    # layouts; the kernels' own bound against eager, 2e-5, is within it).
    assert result.losses == pytest.approx(single.losses, rel=1e-4)
    # The export gathers the shards (with TP, the tied embedding stayed tied).
    # Per tensor, as the losses; a misplaced or missing shard would be off by
    # the tensor's own size.
    assert_same_tensors(hf_run[0] / "hf" / "step-3", tmp_path / layout / "hf" / "step-3",
                        norm_rtol=1e-4)
