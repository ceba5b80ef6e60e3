"""The model card's data-mixture table: the mixtures the run was actually configured with."""

from __future__ import annotations

import pytest

from swallow_titan.hf.model_card import TrainingSummary, render_model_card
from swallow_titan.hf.run_record import RunRecord

HF_CONFIG = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 2048,
    "rope_theta": 500000.0,
}
SOURCES = [
    {"name": "ja", "domain": "ja", "path": "ja.jsonl", "weight": 3.0},
    {"name": "en", "domain": "en", "path": "en.jsonl", "weight": 1.0},
]


def card(data: dict) -> str:
    job = {"data": data, "training": {"steps": 100}}
    summary = TrainingSummary(
        step=100, tokens_trained=None, source_tokens={"ja": 600, "en": 400},
        training_loss=None, validation_loss=None,
    )
    return render_model_card(
        RunRecord(hf_config=HF_CONFIG, job_config=job), summary,
        title="t", model_id="m", dtype="bfloat16",
    )


def test_without_stages_the_target_share_comes_from_the_source_weights():
    text = card({"sources": SOURCES})
    assert "| source | domain | data | target share | tokens trained | actual share |" in text
    assert "| ja | ja | `ja.jsonl` | 75.0% | 600 | 60.0% |" in text
    assert "| en | en | `en.jsonl` | 25.0% | 400 | 40.0% |" in text


def test_with_stages_each_stage_has_its_own_target_share_and_the_source_weights_are_not_shown():
    stages = [
        {"name": "main", "until_step": 80, "weights": {"ja": 1.0, "en": 1.0}},
        {"name": "anneal", "until_step": 0, "weights": {"ja": 1.0}},
    ]
    text = card({"sources": SOURCES, "stages": stages})
    header = "| source | domain | data | main (steps 1-80) | anneal (steps 81-100) | tokens trained |"
    assert header in text
    # ja: 1/2 in "main", 1/1 in "anneal"; en is not listed in "anneal", so 0 there.
    assert "| ja | ja | `ja.jsonl` | 50.0% | 100.0% | 600 | 60.0% |" in text
    assert "| en | en | `en.jsonl` | 50.0% | 0.0% | 400 | 40.0% |" in text
    assert "75.0%" not in text


def summary_of(tokens: int | None) -> TrainingSummary:
    return TrainingSummary(step=10, tokens_trained=tokens, source_tokens=None,
                           training_loss=None, validation_loss=None)


@pytest.mark.parametrize("tokens, shown", [
    (999_999, "999,999"),
    (1_000_000, "1,000,000 (1.00M)"),
    (999_999_999, "999,999,999 (1000.00M)"),
    (1_000_000_000, "1,000,000,000 (1.00B)"),
    (None, "not recorded"),
])
def test_tokens_trained_are_shown_exactly_with_their_scale_from_the_threshold_on(tokens, shown):
    text = render_model_card(RunRecord(hf_config=HF_CONFIG, job_config=None), summary_of(tokens),
                             title="t", model_id="m", dtype="bfloat16")
    assert f"- Tokens trained: {shown}\n" in text


def test_the_minimum_learning_rate_is_the_peak_times_its_factor():
    job = {"optimizer": {"lr": 2.0e-5}, "lr_scheduler": {"min_lr_factor": 0.1}}
    text = render_model_card(RunRecord(hf_config=HF_CONFIG, job_config=job), summary_of(None),
                             title="t", model_id="m", dtype="bfloat16")
    assert "| learning rate | `2e-05` |" in text
    assert f"| minimum learning rate | `{2.0e-5 * 0.1:g}` |" in text
    job["lr_scheduler"] = {}
    text = render_model_card(RunRecord(hf_config=HF_CONFIG, job_config=job), summary_of(None),
                             title="t", model_id="m", dtype="bfloat16")
    assert "| minimum learning rate | not recorded |" in text
