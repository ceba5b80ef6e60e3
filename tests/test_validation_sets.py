"""Per-domain validation sets: fixed windows, split evenly over ranks, checked in the config."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from support import TINY_CONFIG, tiny_tokenizer
from swallow_titan.components.preflight import check_job_config
from swallow_titan.config.manager import ConfigError, load_job_config
from swallow_titan.components.validation import HeldOutLoader, PerDomainValidator
from swallow_titan.config.sections import ValidationSet

SEQ_64 = ["--training.seq_len", "64", "--validation.seq_len", "64"]


def validator(dp_rank: int = 0, dp_world_size: int = 1, *overrides: str) -> PerDomainValidator:
    config = load_job_config(TINY_CONFIG, [*SEQ_64, "--validation.local_batch_size", "2", *overrides])
    return PerDomainValidator(
        job_config=config,
        dp_world_size=dp_world_size,
        dp_rank=dp_rank,
        tokenizer=tiny_tokenizer(),
        parallel_dims=None,
        loss_fn=None,
        validation_context=None,
        maybe_enable_amp=None,
        metrics_processor=None,
    )


def windows(v: PerDomainValidator, name: str) -> torch.Tensor:
    (vset,) = [s for s in v.sets if s.name == name]
    return torch.cat([labels for _, labels in v.batches(vset)])


def test_a_set_is_the_same_windows_at_every_validation():
    first, second = validator(), validator()
    assert torch.equal(windows(first, "en"), windows(second, "en"))
    assert windows(first, "en").shape == (4, 64)  # sequences = 4 in tiny_cpu.toml


def test_sets_hold_their_own_documents():
    v = validator()
    assert not torch.equal(windows(v, "ja"), windows(v, "code"))


def test_two_ranks_split_the_windows_of_one_rank():
    whole = windows(validator(), "math")
    rank0, rank1 = windows(validator(0, 2), "math"), windows(validator(1, 2), "math")
    # One global batch of 4: rank 0 holds windows 0-1, rank 1 windows 2-3.
    assert torch.equal(torch.cat([rank0, rank1]), whole)


def test_sequences_are_rounded_down_to_whole_global_batches():
    v = validator(0, 1, "--validation.local_batch_size", "3")
    assert windows(v, "en").shape == (3, 64)  # 4 asked, batches of 3


# ------------------------------------------------------------------ config checks


def error_of(*overrides: str, text: str = "", world_size: int = 1, tmp_path=None) -> str:
    path = TINY_CONFIG
    if text:
        path = tmp_path / "job.toml"
        path.write_text(TINY_CONFIG.read_text() + "\n" + text)
    with pytest.raises(ConfigError) as e:
        check_job_config(load_job_config(path, list(overrides)), world_size, str(path))
    return str(e.value)


def test_dataset_path_is_rejected_with_the_way_to_sets():
    message = error_of("--validation.dataset_path", "./assets/samples/val/ja.jsonl")
    assert "validation.dataset_path" in message and "[[validation.sets]]" in message


def test_a_set_smaller_than_one_batch_is_rejected_for_the_world_size():
    message = error_of(world_size=2)  # 4 sequences, batches of 4 x 2 ranks
    assert "validation.sets[0].sequences" in message and "4 x 2 = 8" in message


def test_duplicate_set_names_are_rejected(tmp_path):
    text = '[[validation.sets]]\nname = "ja"\npath = "./assets/samples/val/en.jsonl"\n'
    message = error_of(text=text, tmp_path=tmp_path)
    assert "validation.sets[4].name" in message and "used twice" in message


def test_a_set_name_that_cannot_be_a_tag_is_rejected(tmp_path):
    text = '[[validation.sets]]\nname = "ja web"\npath = "./assets/samples/val/en.jsonl"\n'
    assert "validation.sets[4].name" in error_of(text=text, tmp_path=tmp_path)


def test_a_weight_in_a_validation_set_is_rejected(tmp_path):
    text = '[[validation.sets]]\nname = "x"\nweight = 2.0\npath = "./assets/samples/val/en.jsonl"\n'
    message = error_of(text=text, tmp_path=tmp_path)
    assert "validation.sets[4]" in message and "weight" in message


def test_a_set_reading_training_files_is_not_held_out(tmp_path):
    text = '[[validation.sets]]\nname = "leak"\npath = "./assets/samples/ja.jsonl"\n'
    message = error_of(text=text, tmp_path=tmp_path)
    assert "validation.sets[4] 'leak'" in message
    assert "data.sources[0] 'ja_sample' trains on" in message


def test_validation_without_sets_is_rejected(tmp_path):
    path = tmp_path / "job.toml"
    source = TINY_CONFIG.read_text()
    path.write_text(source[: source.index("# One held-out set per domain")])
    with pytest.raises(ConfigError, match="no \\[\\[validation.sets\\]\\] entry"):
        check_job_config(load_job_config(path), 1, str(path))


def test_pinned_memory_async_checkpoints_are_refused_on_cpu():
    message = error_of("--checkpoint.async_mode", "async_with_pinned_mem")
    assert "checkpoint.async_mode" in message and "needs a GPU" in message


def test_max_consecutive_skips_must_be_positive():
    assert "guard.max_consecutive_skips" in error_of("--guard.max_consecutive_skips", "0")


def test_each_set_is_validated_by_a_torchtitan_validator_built_by_its_constructor():
    import torchtitan.components.validate as torchtitan_validate
    from torchtitan.components.validate import Validator

    builder = torchtitan_validate.build_text_validation_dataloader
    v = validator()
    assert set(v.validators) == {s.name for s in v.sets}
    for name, inner in v.validators.items():
        assert type(inner) is Validator
        # What its validate() reads is what its constructor set from our arguments.
        assert inner.validation_dataloader is v.loaders[name]
        assert inner.metrics_processor is v.recorders[name]
    # The constructor's dataloader builder is torchtitan's again afterwards.
    assert torchtitan_validate.build_text_validation_dataloader is builder


def test_a_set_with_fewer_documents_than_asked_is_read_once_and_says_so(tmp_path, caplog):
    path = tmp_path / "few.jsonl"
    texts = [f"held-out document {i} " + "word " * 40 for i in range(6)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + "\n")
    tok = tiny_tokenizer()
    tokens = sum(len(tok.encode_ordinary(t)) + 2 for t in texts)  # BOS + text + EOS each
    config = load_job_config(TINY_CONFIG, [*SEQ_64, "--validation.local_batch_size", "2"])
    loader = HeldOutLoader(ValidationSet(name="few", path=str(path), sequences=64), config, tok,
                           dp_rank=0, dp_world_size=2)
    with caplog.at_level(logging.WARNING):
        got = torch.cat([labels for _, labels in loader.batches()])
    # Whole global batches of 2 ranks x 2 out of the windows the documents fill, no repeats.
    full_windows = tokens // (64 + 1)
    assert got.shape[0] * 2 == full_windows // 4 * 4 < 64
    assert "evaluating" in caplog.text and "of the 64 sequences" in caplog.text
    assert "the documents hold no more" in caplog.text
