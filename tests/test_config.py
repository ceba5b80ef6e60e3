"""Config errors are caught early and name the file, the key and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO, TINY_CONFIG
from swallow_titan.components.preflight import check_job_config
from swallow_titan.config.manager import ConfigError, load_job_config


def write_config(tmp_path: Path, text: str) -> Path:
    """The tiny config with ``text`` appended (TOML allows adding keys to tables
    only once, so tests append whole new tables or replace lines)."""
    path = tmp_path / "job.toml"
    path.write_text(TINY_CONFIG.read_text() + "\n" + text)
    return path


def replace_line(tmp_path: Path, old: str, new: str) -> Path:
    source = TINY_CONFIG.read_text()
    assert old in source
    path = tmp_path / "job.toml"
    path.write_text(source.replace(old, new))
    return path


def error_of(path: Path, *overrides: str, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as e:
        config = load_job_config(path, list(overrides))
        check_job_config(config, world_size, str(path))
    return str(e.value)


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = replace_line(tmp_path, "local_batch_size = 8\n", "local_batch_sise = 8\n")
    message = error_of(path)
    assert str(path) in message
    assert "training.local_batch_sise" in message
    assert "did you mean 'local_batch_size'" in message


def test_unknown_section_is_named(tmp_path):
    message = error_of(write_config(tmp_path, "[trainnig]\nsteps = 3\n"))
    assert "trainnig" in message and "unknown key" in message


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = replace_line(tmp_path, "steps = 60", 'steps = "60"')
    message = error_of(path)
    assert "training.steps" in message
    assert "expected an integer" in message and "'60' (a string)" in message


def test_unknown_literal_value_lists_the_choices(tmp_path):
    path = replace_line(tmp_path, 'decay_type = "cosine"', 'decay_type = "cosin"')
    message = error_of(path)
    assert "lr_scheduler.decay_type" in message and "'cosine'" in message


def test_wrong_type_inside_a_data_source_names_its_index(tmp_path):
    path = replace_line(tmp_path, "weight = 0.2\npath = \"./assets/samples/en.jsonl\"",
                        "weight = \"high\"\npath = \"./assets/samples/en.jsonl\"")
    message = error_of(path)
    assert "data.sources[1].weight" in message and "expected a number" in message


def test_impossible_parallel_degrees_are_reported(tmp_path):
    message = error_of(TINY_CONFIG, "--parallelism.tensor_parallel_degree", "3", world_size=4)
    assert "4 processes cannot be split" in message and "= 3" in message


def test_global_batch_not_divisible_is_reported():
    message = error_of(TINY_CONFIG, "--training.global_batch_size", "20")
    assert "training.global_batch_size" in message and "multiple of" in message


def test_tp_degree_must_divide_kv_heads():
    message = error_of(
        TINY_CONFIG,
        "--parallelism.tensor_parallel_degree", "4",
        "--parallelism.data_parallel_shard_degree", "1",
        world_size=4,
    )
    assert "n_kv_heads = 2" in message


def test_missing_data_file_is_reported(tmp_path):
    path = replace_line(tmp_path, "./assets/samples/math.jsonl", "./assets/samples/nope-*.jsonl")
    message = error_of(path)
    assert "data.sources[3]" in message and "matches no file" in message


def test_missing_tokenizer_folder_is_reported():
    message = error_of(TINY_CONFIG, "--model.hf_assets_path", "/nonexistent/tok")
    assert "model.hf_assets_path" in message and "/nonexistent/tok" in message


def test_unknown_flavor_lists_the_flavors():
    message = error_of(TINY_CONFIG, "--model.flavor", "9B")
    assert "model.flavor" in message and "'8B'" in message and "'tiny'" in message


def test_missing_config_file_is_reported(tmp_path):
    message = error_of(tmp_path / "absent.toml")
    assert "absent.toml" in message and "not found" in message


def test_invalid_toml_is_reported(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[training\nsteps = 3\n")
    assert "not valid TOML" in error_of(path)


def test_bool_override_accepts_true_and_false():
    config = load_job_config(
        TINY_CONFIG, ["--checkpoint.enable", "false", "--compile.enable=true"]
    )
    assert config.checkpoint.enable is False
    assert config.compile.enable is True


def test_training_start_stops_on_a_config_error_before_any_work(tmp_path):
    path = replace_line(tmp_path, "steps = 60", "steps = -1")
    proc = subprocess.run(
        [sys.executable, "-m", "swallow_titan.train", "--job.config_file", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert f"{path}: training.steps: must be >= 1" in proc.stderr


def test_a_warmup_longer_than_a_short_trial_run_is_allowed():
    config = load_job_config(TINY_CONFIG, ["--training.steps", "4"])
    check_job_config(config, 1, str(TINY_CONFIG))  # torchtitan shortens the warm-up


FLOAT8 = ("--model.converters", "quantize.linear.float8",
          "--quantize.linear.float8.emulate", "true")


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_recipe_name_with_fsdp_float8_all_gather_is_refused(tmp_path, recipe):
    # torchtitan 0.2.2's Float8LinearConverter asserts against this pair while
    # building the model; the check must stop it first, naming both keys.
    path = write_config(
        tmp_path,
        f'[quantize.linear.float8]\nrecipe_name = "{recipe}"\n'
        "enable_fsdp_float8_all_gather = true\n",
    )
    message = error_of(path, *FLOAT8)
    assert str(path) in message
    assert "quantize.linear.float8.recipe_name" in message
    assert "quantize.linear.float8.enable_fsdp_float8_all_gather" in message


def test_float8_tensorwise_default_with_fsdp_float8_all_gather_passes(tmp_path):
    path = write_config(
        tmp_path, "[quantize.linear.float8]\nenable_fsdp_float8_all_gather = true\n"
    )
    check_job_config(load_job_config(path, list(FLOAT8)), 1, str(path))


def test_recipe_float8_options_are_accepted_by_the_check():
    from swallow_titan.config.checks import check_values

    recipe = REPO / "train_configs" / "swallow_8b_v05.toml"
    config = load_job_config(recipe)
    assert config.quantize.linear.float8.enable_fsdp_float8_all_gather
    check_values(config, 64, str(recipe))


def test_emulated_float8_with_a_compiled_model_is_refused_on_cpu():
    message = error_of(TINY_CONFIG, *FLOAT8, "--compile.enable", "true")
    assert "compile.enable" in message and "emulate" in message
