"""Checkpoint averaging: offline (``python -m swallow_titan.average``) and in the loop ([averaging]).

One tiny run writes a checkpoint after every step, with an EMA and a tail
window in the loop; the averages are checked against the means and the
recurrence computed here from those checkpoints, tensor by tensor.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from support.runs import run_training
from swallow_titan import average as average_cli
from swallow_titan.checkpoint.average import AverageError, AveragedCheckpoint, parse_weights
from swallow_titan.checkpoint.dcp_reader import DCPCheckpoint
from swallow_titan.hf.run_record import RUN_RECORD_FILE

pytestmark = pytest.mark.slow

STEPS = 4
EMA_DECAY = 0.75
TAIL_STEPS = 3  # the window ending at step 4: steps 2, 3, 4
AVERAGING = [
    "--averaging.ema_decay", str(EMA_DECAY),
    "--averaging.tail_steps", str(TAIL_STEPS),
    "--averaging.tail_every", str(STEPS),
    "--validation.enable", "true",
    "--validation.freq", str(STEPS),
    "--validation.steps", "1",
    "--validation.seq_len", "64",
    "--validation.local_batch_size", "4",
    "--hf.export_at_end", "true",
    "--hf.export_dtype", "float32",
    "--metrics.enable_tensorboard", "true",  # the model cards' losses
]
# fp32 rounding: each product and each sum is rounded once (relative 2^-24);
# n terms give at most 2n roundings of the running sum's magnitude.
FP32_EPS = 2.0**-24


CHECKPOINT_EVERY_STEP = [
    "--checkpoint.enable", "true",
    "--checkpoint.interval", "1",
    "--checkpoint.keep_latest_k", "0",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 4-step run with a checkpoint after every step, an EMA and a tail window."""
    dump = tmp_path_factory.mktemp("avg") / "out"
    run_training(dump, "--training.steps", str(STEPS), *CHECKPOINT_EVERY_STEP, *AVERAGING).check()
    return dump


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoint" / f"step-{step}"


def model_names(run: Path) -> list[str]:
    stored = DCPCheckpoint(step_dir(run, 1)).tensors()
    names = [n for n in stored if not n.startswith(("optimizer.", "averaging."))]
    assert "tok_embeddings.weight" in names and "output.weight" in names
    return names


def read(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    return DCPCheckpoint(path).read_tensors(names)


def fixed_order_mean(inputs: list[dict[str, torch.Tensor]], weights: list[float], name: str) -> torch.Tensor:
    """sum_i (w_i * x_i), each product and each sum rounded to fp32, in input order."""
    total = inputs[0][name].float() * weights[0]
    for values, w in zip(inputs[1:], weights[1:]):
        total = total + values[name].float() * w
    return total


def assert_is_the_weighted_mean(out: dict[str, torch.Tensor], inputs, weights: list[float]) -> None:
    for name, got in out.items():
        # Exact: the documented fp32 accumulation in input order.
        assert torch.equal(got, fixed_order_mean(inputs, weights, name)), name
        # And within fp32 rounding of the exact mean (float64).
        exact = sum(values[name].double() * w for values, w in zip(inputs, weights))
        scale = sum(values[name].double().abs() * w for values, w in zip(inputs, weights))
        assert ((got.double() - exact).abs() <= 2 * len(inputs) * FP32_EPS * scale).all(), name


def test_uniform_average_of_three_checkpoints_is_their_fp32_mean(run, tmp_path):
    out = tmp_path / "avg"
    paths = [step_dir(run, s) for s in (2, 3, 4)]
    assert average_cli.main([*map(str, paths), "--out", str(out)]) == 0
    names = model_names(run)
    inputs = [read(p, names) for p in paths]
    averaged = DCPCheckpoint(out)
    assert sorted(averaged.tensors()) == sorted(names)  # model weights only
    got = averaged.read_tensors(names)
    assert_is_the_weighted_mean(got, inputs, [1 / 3] * 3)
    # The inputs differ (training moved them), so the mean is none of them.
    assert not torch.equal(got["output.weight"], inputs[-1]["output.weight"])
    record = json.loads((out / RUN_RECORD_FILE).read_text())
    assert [(e["step"], e["weight"]) for e in record["averaged_from"]] == [
        (2, 1 / 3), (3, 1 / 3), (4, 1 / 3)
    ]


def test_weighted_average_uses_the_normalised_weights(run, tmp_path):
    out = tmp_path / "avg"
    paths = [step_dir(run, 1), step_dir(run, 4)]
    assert average_cli.main([*map(str, paths), "--out", str(out), "--weights", "1,3"]) == 0
    names = model_names(run)
    got = DCPCheckpoint(out).read_tensors(names)
    assert_is_the_weighted_mean(got, [read(p, names) for p in paths], [0.25, 0.75])


def test_weights_must_be_positive_and_one_per_checkpoint():
    assert parse_weights(None, 4) == [0.25] * 4
    assert parse_weights("2,6", 2) == [0.25, 0.75]
    for text, problem in (("1,2", "2 weights for 3 checkpoints"), ("1,0,1", "positive"),
                          ("1,-1,1", "positive"), ("1,x,1", "comma-separated numbers")):
        with pytest.raises(AverageError, match=problem):
            parse_weights(text, 3)


def test_the_average_reads_one_tensor_of_one_checkpoint_at_a_time(run, monkeypatch):
    """Peak memory: the output, one accumulator and one input tensor, never a whole checkpoint."""
    real_read = DCPCheckpoint.read_tensors
    alive: list[weakref.ref] = []
    most_alive = 0

    def spying_read(self, names):
        nonlocal most_alive
        assert len(names) == 1, names
        most_alive = max(most_alive, sum(ref() is not None for ref in alive))
        got = real_read(self, names)
        alive.extend(weakref.ref(t) for t in got.values())
        return got

    monkeypatch.setattr(DCPCheckpoint, "read_tensors", spying_read)
    average = AveragedCheckpoint([step_dir(run, s) for s in (2, 3, 4)])
    count = 0
    for _name, tensor in average.iter_tensors():
        count += 1
    assert count == len(model_names(run))
    assert len(alive) == 3 * count  # every tensor read once from every checkpoint
    assert most_alive == 0  # each input was dropped before the next one was read


def rewritten_copy(source: Path, target: Path, change) -> Path:
    """A DCP checkpoint with ``source``'s model tensors passed through ``change``, and its record."""
    names = model_names(source.parent.parent)
    state = change(read(source, names))
    dcp.save(state, checkpoint_id=str(target), no_dist=True)
    shutil.copyfile(source.parent / RUN_RECORD_FILE, target / RUN_RECORD_FILE)
    return target


def test_a_tensor_of_another_shape_is_refused_naming_file_and_tensor(run, tmp_path, capsys):
    def shorter_output(state):
        state["output.weight"] = state["output.weight"][:-1].clone()
        return state

    odd = rewritten_copy(step_dir(run, 2), tmp_path / "odd", shorter_output)
    out = tmp_path / "avg"
    assert average_cli.main([str(step_dir(run, 1)), str(odd), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"{odd}: tensor 'output.weight' has shape [4095, 256]" in error
    assert not out.exists()


def test_a_checkpoint_of_another_model_is_refused_naming_the_setting(run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(step_dir(run, 2), other)
    record = json.loads((run / "checkpoint" / RUN_RECORD_FILE).read_text())
    record["hf_config"]["num_hidden_layers"] = 2
    record["job_config"]["model"]["flavor"] = "tiny2"
    (other / RUN_RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(AverageError, match=rf"{other}/{RUN_RECORD_FILE}: model.flavor 'tiny2'"):
        AveragedCheckpoint([step_dir(run, 1), other])
    record["job_config"]["model"]["flavor"] = "tiny"
    (other / RUN_RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(AverageError, match=r"hf_config.num_hidden_layers = 2"):
        AveragedCheckpoint([step_dir(run, 1), other])


def test_bfloat16_checkpoints_average_in_fp32_and_stay_bfloat16(run, tmp_path):
    def to_bf16(state):
        return {k: v.to(torch.bfloat16) for k, v in state.items()}

    paths = [rewritten_copy(step_dir(run, s), tmp_path / f"bf16-{s}", to_bf16) for s in (1, 2, 3)]
    out = tmp_path / "avg"
    assert average_cli.main([*map(str, paths), "--out", str(out)]) == 0
    names = model_names(run)
    inputs = [read(p, names) for p in paths]
    got = DCPCheckpoint(out).read_tensors(names)
    summed_in_bf16_differs = False
    for name in names:
        assert got[name].dtype == torch.bfloat16
        expected = fixed_order_mean(inputs, [1 / 3] * 3, name).to(torch.bfloat16)
        assert torch.equal(got[name], expected), name
        in_bf16 = inputs[0][name] * (1 / 3) + inputs[1][name] * (1 / 3) + inputs[2][name] * (1 / 3)
        summed_in_bf16_differs |= not torch.equal(in_bf16, expected)
    assert summed_in_bf16_differs  # the fp32 accumulation is visible


def test_the_dcp_average_is_a_starting_checkpoint(run, tmp_path):
    from support.model import build_model
    from swallow_titan.checkpoint.model_weights import load_dcp_model_weights

    out = tmp_path / "avg"
    assert average_cli.main([str(step_dir(run, 3)), str(step_dir(run, 4)), "--out", str(out)]) == 0
    model, _ = build_model()
    assert load_dcp_model_weights([model], str(out)) == len(model_names(run))
    expected = DCPCheckpoint(out).read_tensors(["norm.weight"])["norm.weight"]
    assert torch.equal(model.norm.weight.detach(), expected)


def test_hf_average_loads_in_transformers_and_its_card_lists_the_steps(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    paths = [step_dir(run, 3), step_dir(run, 4)]
    args = [*map(str, paths), "--out", str(out), "--hf", "--dtype", "float32", "--weights", "1,3"]
    assert average_cli.main(args) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    names = ["tok_embeddings.weight", "norm.weight"]
    expected = AveragedCheckpoint(paths, [0.25, 0.75]).read_tensors(names)
    assert torch.equal(model.model.embed_tokens.weight.detach(), expected["tok_embeddings.weight"])
    assert torch.equal(model.model.norm.weight.detach(), expected["norm.weight"])
    card = (out / "README.md").read_text()
    assert "### Averaged weights" in card
    assert f"| `3` | 0.25 | `{paths[0]}` |" in card
    assert f"| `4` | 0.75 | `{paths[1]}` |" in card
    assert "Steps trained: `4`" in card


# ------------------------------------------------------------------ in the loop


def in_loop(run: Path, step: int, kind: str, names: list[str]) -> dict[str, torch.Tensor]:
    stored = read(step_dir(run, step), [f"averaging.{kind}.{n}" for n in names])
    return {n: stored[f"averaging.{kind}.{n}"] for n in names}


def test_in_loop_tail_average_equals_the_offline_average_of_the_same_steps(run):
    names = model_names(run)
    tail = in_loop(run, STEPS, "tail", names)
    offline = AveragedCheckpoint([step_dir(run, s) for s in (2, 3, 4)])
    for name in names:
        assert torch.equal(tail[name], offline.average(name)), name
    # Written after the last step too, as a model-weights checkpoint.
    final = read(run / "checkpoint" / f"tail-step-{STEPS}", names)
    assert all(torch.equal(final[n], tail[n]) for n in names)


def test_ema_equals_its_recurrence_computed_from_the_saved_weights(run):
    names = model_names(run)
    ema = read(step_dir(run, 1), names)  # the EMA starts as the weights after step 1
    for step in range(1, STEPS + 1):
        weights = read(step_dir(run, step), names)
        if step > 1:
            ema = {n: ema[n] * EMA_DECAY + weights[n] * (1 - EMA_DECAY) for n in names}
        stored = in_loop(run, step, "ema", names)
        for name in names:
            assert torch.equal(stored[name], ema[name]), (step, name)
    assert not torch.equal(ema["output.weight"], weights["output.weight"])


def test_a_resumed_run_continues_the_averages_exactly(run, tmp_path):
    dump = tmp_path / "out"
    (dump / "checkpoint").mkdir(parents=True)
    for step in (1, 2):
        shutil.copytree(step_dir(run, step), step_dir(dump, step))
    shutil.copyfile(run / "checkpoint" / RUN_RECORD_FILE, dump / "checkpoint" / RUN_RECORD_FILE)
    resumed = run_training(dump, "--training.steps", str(STEPS), *CHECKPOINT_EVERY_STEP, *AVERAGING).check()
    assert sorted(resumed.losses) == [3, 4]
    names = model_names(run)
    for kind in ("ema", "tail"):
        first, second = in_loop(run, STEPS, kind, names), in_loop(dump, STEPS, kind, names)
        assert all(torch.equal(first[n], second[n]) for n in names), kind


def test_the_averages_are_validated_beside_the_raw_weights(run):
    from support.runs import run_log

    logged: dict[int, dict] = {}
    for record in run_log(run):
        logged.setdefault(record["step"], {}).update(record)
    last = logged[STEPS]
    for kind in ("ema", "tail"):
        assert math.isfinite(last[f"val/{kind}/loss"])
        assert last[f"val/{kind}/loss"] != last["val/loss"]
        per_set = [k for k in last if k.startswith(f"val/{kind}/") and k.count("/") == 3]
        assert per_set and all(k.endswith(("/loss", "/perplexity")) for k in per_set)
    # The tail is validated only when its window is complete (step 4), the EMA whenever
    # validation runs.
    for step, values in logged.items():
        if step != STEPS:
            assert "val/tail/loss" not in values
            assert ("val/ema/loss" in values) == ("val/loss" in values)


def test_the_averages_are_exported_beside_the_last_weights(run):
    from safetensors.torch import load_file

    names = model_names(run)
    for kind in ("ema", "tail"):
        folder = run / "hf" / f"step-{STEPS}-{kind}"
        tensors = {}
        for file in folder.glob("*.safetensors"):
            tensors.update(load_file(file))
        expected = in_loop(run, STEPS, kind, names)
        assert torch.equal(tensors["model.norm.weight"], expected["norm.weight"]), kind
        assert (folder / "README.md").is_file()


def test_the_exported_averages_cards_say_which_average_they_hold(run):
    from support.runs import run_log

    last = {}
    for record in run_log(run):
        if record["step"] == STEPS:
            last.update(record)
    cards = {
        kind: (run / "hf" / f"step-{STEPS}{suffix}" / "README.md").read_text()
        for kind, suffix in (("raw", ""), ("ema", "-ema"), ("tail", "-tail"))
    }
    assert "Averaged weights" not in cards["raw"] and "moving average" not in cards["raw"]
    ema = cards["ema"]
    assert "### Averaged weights" in ema and "exponential moving average (EMA)" in ema
    assert f"`[averaging] ema_decay = {EMA_DECAY:g}`" in ema
    assert f"`ema = ema * {EMA_DECAY:g} + w * {1 - EMA_DECAY:g}`" in ema
    tail = cards["tail"]
    assert "### Averaged weights" in tail and "**tail average**" in tail
    assert f"steps `{STEPS - TAIL_STEPS + 1}`-`{STEPS}` (`[averaging] tail_steps = {TAIL_STEPS}`)" in tail
    assert "exponential" not in tail
    # Each card's validation loss is its own weights' (val/<kind>/loss), not the raw one.
    for kind in ("raw", "ema", "tail"):
        tag = "val/loss" if kind == "raw" else f"val/{kind}/loss"
        found = re.search(r"Final validation loss: ([0-9.]+) \(step (\d+), `([^`]+)`\)", cards[kind])
        assert found and (int(found[2]), found[3]) == (STEPS, tag), kind
        # TensorBoard keeps fp32, the card prints 4 decimals.
        assert abs(float(found[1]) - last[tag]) <= 5e-5 + 1e-6 * abs(last[tag]), kind


@pytest.mark.distributed
def test_a_two_process_fsdp_run_averages_each_shard_in_place(tmp_path):
    from support.overrides import FSDP2

    dump = tmp_path / "fsdp"
    run_training(
        dump,
        "--training.steps", "3",
        *CHECKPOINT_EVERY_STEP,
        "--averaging.ema_decay", str(EMA_DECAY),
        "--averaging.tail_steps", "2",
        "--averaging.tail_every", "3",
        *FSDP2,
        nproc=2,
    ).check()
    names = model_names(dump)
    # Kept sharded: each rank wrote its own piece of every average.
    metadata = DCPCheckpoint(step_dir(dump, 3)).metadata.state_dict_metadata
    assert len(metadata["averaging.ema.tok_embeddings.weight"].chunks) == 2
    # Elementwise on the shards: exactly the recurrence and the offline mean of the
    # weights the run saved.
    ema = read(step_dir(dump, 1), names)
    for step in (2, 3):
        weights = read(step_dir(dump, step), names)
        ema = {n: ema[n] * EMA_DECAY + weights[n] * (1 - EMA_DECAY) for n in names}
    stored = in_loop(dump, 3, "ema", names)
    assert all(torch.equal(stored[n], ema[n]) for n in names)
    tail = in_loop(dump, 3, "tail", names)
    offline = AveragedCheckpoint([step_dir(dump, 2), step_dir(dump, 3)])
    assert all(torch.equal(tail[n], offline.average(n)) for n in names)
