"""The start rule (resume, else HF weights, else random) and the [hf] config checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import REPO, TINY_CONFIG
from support.hf import ODD_CONFIG, TINY_FLAVOR_CONFIG, drop_tensor, save_random_llama
from swallow_titan.components.start_rule import decide_start
from swallow_titan.components.preflight import check_job_config, check_structure, file_problems
from swallow_titan.config.manager import ConfigError, load_job_config

RECIPE = REPO / "train_configs" / "swallow_8b_v05.toml"


def tiny(dump: Path, *overrides: str):
    return load_job_config(TINY_CONFIG, ["--job.dump_folder", str(dump), *overrides])


def complete_checkpoint(folder: Path) -> None:
    """A small but real DCP checkpoint."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group
        dcp.save({"w": torch.arange(64.0)}, checkpoint_id=str(folder))


def test_no_checkpoint_folder_loads_the_hf_weights(tmp_path):
    decision = decide_start(tiny(tmp_path, "--hf.load_path", "/models/llama"))
    assert decision.kind == "hf" and decision.path == "/models/llama"
    assert decision.message == (
        f"Start rule: no checkpoint in {tmp_path}/checkpoint; loading Hugging Face "
        "weights from /models/llama"
    )


def test_an_existing_but_empty_checkpoint_folder_still_loads_the_hf_weights(tmp_path):
    # torchtitan 0.2.2 skips its HF load whenever the folder exists.
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "step-5").mkdir()  # a save that crashed: no .metadata
    assert decide_start(tiny(tmp_path, "--hf.load_path", "/models/llama")).kind == "hf"


def test_a_checkpoint_in_the_run_folder_wins_over_the_hf_weights(tmp_path):
    complete_checkpoint(tmp_path / "checkpoint" / "step-4")
    complete_checkpoint(tmp_path / "checkpoint" / "step-8")
    decision = decide_start(tiny(tmp_path, "--hf.load_path", "/models/llama"))
    assert decision.kind == "resume"
    assert decision.message == (
        f"Start rule: resuming from the run's own checkpoint {tmp_path}/checkpoint/step-8; "
        "hf.load_path = '/models/llama' not read"
    )


def test_a_truncated_newest_checkpoint_is_not_the_one_resumed_from(tmp_path):
    complete_checkpoint(tmp_path / "checkpoint" / "step-4")
    complete_checkpoint(tmp_path / "checkpoint" / "step-8")
    data_file = next((tmp_path / "checkpoint" / "step-8").glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:10])
    decision = decide_start(tiny(tmp_path))
    assert decision.kind == "resume"
    assert decision.path == f"{tmp_path}/checkpoint/step-4"


def test_checkpoint_load_step_picks_the_step_to_resume(tmp_path):
    complete_checkpoint(tmp_path / "checkpoint" / "step-4")
    complete_checkpoint(tmp_path / "checkpoint" / "step-8")
    decision = decide_start(tiny(tmp_path, "--checkpoint.load_step", "4"))
    assert decision.path == f"{tmp_path}/checkpoint/step-4"


def test_hf_weights_load_even_with_checkpointing_off(tmp_path):
    decision = decide_start(
        tiny(tmp_path, "--checkpoint.enable", "false", "--hf.load_path", "/models/llama")
    )
    assert decision.kind == "hf"
    assert "checkpointing is off" in decision.message


def test_no_starting_weights_is_said_to_be_random(tmp_path):
    decision = decide_start(tiny(tmp_path))
    assert decision.kind == "random"
    assert "starting from random initial weights" in decision.message


def test_a_dcp_starting_checkpoint_is_the_third_choice(tmp_path):
    decision = decide_start(tiny(tmp_path, "--checkpoint.initial_load_path", "/ckpt/converted"))
    assert decision.kind == "dcp" and decision.path == "/ckpt/converted"


def test_hf_weights_come_before_a_dcp_starting_checkpoint_in_the_rule(tmp_path):
    # The config check refuses naming both; the rule's order still says which wins.
    config = tiny(tmp_path, "--hf.load_path", "/hf", "--checkpoint.initial_load_path", "/dcp")
    assert decide_start(config).kind == "hf"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--checkpoint.initial_load_in_hf", "true"], "checkpoint.initial_load_in_hf: use hf.load_path"),
        (["--checkpoint.last_save_in_hf", "true"], "checkpoint.last_save_in_hf: use hf.export_at_end"),
        (["--hf.load_path", "/a", "--checkpoint.initial_load_path", "/b"], "hf.load_path and checkpoint.initial_load_path both name starting weights"),
        (["--checkpoint.initial_load_path", "/b", "--checkpoint.initial_load_model_only", "false"], "checkpoint.initial_load_model_only = false"),
        (["--hf.export_at_end", "true", "--checkpoint.enable", "false"], "hf.export_at_end: exports the last checkpoint, so it needs checkpoint.enable = true"),
        (["--hf.push_to_hub", "org/model"], "hf.push_to_hub: uploads the end-of-run export"),
        (["--hf.export_max_shard_size", "five gigs"], "hf.export_max_shard_size: max shard size 'five gigs'"),
    ],
)
def test_hf_settings_that_cannot_work_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=f"{TINY_CONFIG}: {message}"):
        check_structure(tiny(tmp_path, *overrides), 1, str(TINY_CONFIG))


def test_hf_folder_of_another_model_is_a_config_error_naming_field_file_and_values(tmp_path):
    hf = save_random_llama(tmp_path / "odd", ODD_CONFIG, tokenizer=None)
    config = tiny(tmp_path / "run", "--hf.load_path", str(hf))
    with pytest.raises(ConfigError) as error:
        check_job_config(config, 1, str(TINY_CONFIG))
    message = str(error.value)
    assert f"{TINY_CONFIG}: hf.load_path: {hf / 'config.json'}: hidden_size = 64, but flavor 'tiny' has 256" in message
    assert "num_hidden_layers = 2, but flavor 'tiny' has 4" in message


def test_hf_folder_missing_a_tensor_is_a_config_error_naming_it(tmp_path):
    hf = save_random_llama(tmp_path / "tiny", TINY_FLAVOR_CONFIG, max_shard_size="10GB", tokenizer=None)
    drop_tensor(hf, "lm_head.weight")
    problems = file_problems(tiny(tmp_path / "run", "--hf.load_path", str(hf)), "run.toml")
    assert any("missing: lm_head.weight" in p for p in problems), problems


def test_a_resuming_run_does_not_need_its_hf_folder_any_more(tmp_path):
    complete_checkpoint(tmp_path / "checkpoint" / "step-2")
    config = tiny(tmp_path, "--hf.load_path", str(tmp_path / "deleted"))
    assert file_problems(config, "run.toml") == []


def test_recipe_starts_from_hf_weights_and_exports_at_the_end():
    config = load_job_config(RECIPE)
    assert config.hf.load_path.endswith("Llama-3.1-8B-Instruct")
    assert config.hf.export_at_end and config.hf.base_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert not config.checkpoint.initial_load_in_hf and not config.checkpoint.initial_load_path
    problems = "\n".join(file_problems(config, str(RECIPE)))
    assert "hf.load_path: '/path/to/Llama-3.1-8B-Instruct' is not a folder" in problems
