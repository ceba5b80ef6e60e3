"""Training runs that start from HF weights and end with an HF export ([hf] in the TOML)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import re

import pytest
import torch
from torchtitan.models.llama3.model.model import Transformer

from support.hf import (
    TINY_FLAVOR_CONFIG,
    assert_same_logits,
    assert_same_tensors,
    safetensors_of,
    save_random_llama,
)
from support.overrides import FSDP2, TP2
from support.runs import free_port, run_training, series
from swallow_titan.checkpoint.dcp_reader import DCPCheckpoint
from swallow_titan.hf.convert import convert_hf_to_dcp
from swallow_titan.data.dataloader import source_token_counts
from swallow_titan.model.args import FLAVORS

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

LR = 3e-3
BASE_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def hf_run_args(hf_dir: Path) -> list[str]:
    return [
        "--training.steps", "2",
        "--optimizer.lr", str(LR),
        "--checkpoint.enable", "true",
        "--hf.load_path", str(hf_dir),
        "--hf.base_model", BASE_MODEL,
        "--hf.export_at_end", "true",
        "--hf.export_dtype", "float32",
    ]


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory) -> Path:
    """A random transformers Llama with the `tiny` flavor's shape, in several shards."""
    return save_random_llama(
        tmp_path_factory.mktemp("hf") / "tiny", TINY_FLAVOR_CONFIG, max_shard_size="4MB"
    )


@pytest.fixture(scope="module")
def hf_run(hf_tiny, tmp_path_factory):
    dump = tmp_path_factory.mktemp("run") / "out"
    result = run_training(
        dump,
        *hf_run_args(hf_tiny),
        "--metrics.enable_tensorboard", "true",
        "--validation.enable", "true",
        "--validation.freq", "2",
        "--validation.steps", "1",
        "--validation.seq_len", "64",
        "--validation.local_batch_size", "4",
    ).check()
    return dump, result


def model_from_checkpoint(step_dir: Path) -> Transformer:
    model = Transformer(replace(FLAVORS["tiny"], max_seq_len=64)).eval()
    model.load_state_dict(DCPCheckpoint(step_dir).read_tensors(list(model.state_dict())))
    return model


def test_first_start_loads_the_hf_weights(hf_run, hf_tiny):
    dump, result = hf_run
    assert (
        f"Start rule: no checkpoint in {dump}/checkpoint; loading Hugging Face weights "
        f"from {hf_tiny}"
    ) in result.output
    assert f"Loaded 39 tensors of Hugging Face weights from {hf_tiny}" in result.output
    # Two Adam steps move each weight by about 2 x lr: the export is the HF
    # model plus training, not a random initialisation (embeddings ~N(0, 1)).
    start, end = safetensors_of(hf_tiny), safetensors_of(dump / "hf" / "step-2")
    assert sorted(start) == sorted(end)
    for name in start:
        difference = (end[name] - start[name]).abs().max().item()
        assert 0 < difference < 4 * LR, name


def test_export_at_end_gives_the_logits_of_the_trained_model(hf_run):
    dump, _ = hf_run
    ours = model_from_checkpoint(dump / "checkpoint" / "step-2")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dump / "hf" / "step-2").eval()
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_same_logits(ours(ids), theirs(ids).logits)


def test_model_card_reports_base_recipe_data_steps_and_losses(hf_run):
    dump, result = hf_run
    card = (dump / "hf" / "step-2" / "README.md").read_text()
    assert f"base_model: {BASE_MODEL}" in card
    assert "Steps trained: `2`" in card
    # The checkpoint's spike guard state is read: present, and empty.
    assert "### Loss spikes\n\nNone detected" in card
    assert "Tokens trained: 1,024" in card  # 2 steps x 8 sequences x 64 tokens
    assert f"| learning rate | `{LR}` |" in card
    state = DCPCheckpoint(dump / "checkpoint" / "step-2").read_entry("dataloader")
    for source, tokens in source_token_counts(state).items():
        assert f"| {source} |" in card and f"| {tokens:,} |" in card
    assert f"Final training loss: {result.losses[2]:.4f} (step 2" in card
    assert f"Final validation loss: {result.validation_losses[2]:.4f} (step 2" in card
    # Each [[validation.sets]] entry too, as the run log has it at step 2.
    for name in ("ja", "en", "code", "math"):
        value = series(result.history, f"val/{name}/loss")[2]
        assert f"  - {name}: {value:.4f} (step 2, `val/{name}/loss`)" in card


def test_a_run_starts_from_the_hf_to_dcp_output_as_from_the_hf_folder(hf_run, hf_tiny, tmp_path):
    _, from_hf = hf_run
    converted = convert_hf_to_dcp(hf_tiny, tmp_path / "converted")
    result = run_training(
        tmp_path / "run",
        "--training.steps", "2",
        "--optimizer.lr", str(LR),
        "--checkpoint.enable", "true",
        "--checkpoint.initial_load_path", str(converted),
    ).check()
    assert f"loading model weights from checkpoint.initial_load_path = {converted}" in result.output
    assert result.losses == pytest.approx(from_hf.losses, rel=1e-5)


@pytest.mark.distributed
def test_two_process_fsdp_run_imports_and_exports_like_one_process(hf_run, hf_tiny, tmp_path):
    _, single = hf_run
    result = run_training(
        tmp_path / "fsdp",
        *hf_run_args(hf_tiny),
        *FSDP2,
        nproc=2,
    ).check()
    assert "Applied FSDP to the model" in result.output
    assert "loading Hugging Face weights" in result.output
    assert result.losses == pytest.approx(single.losses, rel=1e-4)
    assert_same_tensors(hf_run[0] / "hf" / "step-2", tmp_path / "fsdp" / "hf" / "step-2", atol=1e-5)


@pytest.mark.distributed
def test_tensor_parallel_run_loads_the_hf_weights_like_one_process(hf_run, hf_tiny, tmp_path):
    _, single = hf_run
    result = run_training(
        tmp_path / "tp",
        *hf_run_args(hf_tiny),
        *TP2,
        "--training.local_batch_size", "8",
        nproc=2,
    ).check()
    assert "Tensor Parallelism to the model" in result.output
    assert result.losses == pytest.approx(single.losses, rel=1e-4)
    assert (tmp_path / "tp" / "hf" / "step-2" / "model.safetensors.index.json").is_file()


def test_second_start_resumes_and_never_reads_the_hf_folder(hf_run, hf_tiny):
    dump, _ = hf_run
    hidden = hf_tiny.with_name("moved-away")
    hf_tiny.rename(hidden)  # a read of [hf] load_path would fail
    try:
        result = run_training(dump, *hf_run_args(hf_tiny), "--training.steps", "3").check()
    finally:
        hidden.rename(hf_tiny)
    assert (
        f"Start rule: resuming from the run's own checkpoint {dump}/checkpoint/step-2; "
        f"hf.load_path = '{hf_tiny}' not read"
    ) in result.output
    assert "Hugging Face weights" not in result.output
    assert sorted(result.losses) == [3]
    assert (dump / "hf" / "step-3" / "config.json").is_file()


def test_a_failed_hub_push_at_the_end_exits_3_and_keeps_the_export(hf_tiny, tmp_path):
    dump = tmp_path / "run"
    result = run_training(
        dump,
        *hf_run_args(hf_tiny),
        "--training.steps", "1",
        "--hf.push_to_hub", "someone/swallow-test",
        env={
            # Nothing listens there: the Hub is unreachable on any machine.
            "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
            "HF_TOKEN": "hf_not_a_real_token",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        },
    )
    assert re.search(r"exitcode\s*:\s*3\b", result.output), result.output[-3000:]
    assert "could not upload" in result.output and "someone/swallow-test" in result.output
    assert sorted(result.losses) == [1]  # training itself finished
    export = dump / "hf" / "step-1"
    assert (export / "config.json").is_file() and (export / "model.safetensors.index.json").is_file()
