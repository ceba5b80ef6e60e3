"""The lm-eval adapter against lm-eval's own ``hf`` model on the same weights.

A random tiny Llama saved by transformers (with the shipped tiny tokenizer as
tokenizer.json) is evaluated twice on the shipped Japanese tasks: by lm-eval's
``hf`` model (transformers) and by ``SwallowLM`` over swallow-titan's
Transformer loaded from the same folder. Per-request log-likelihoods,
greedy flags, accuracies and generations must agree.

Tolerance: both run in fp32. A continuation's log-likelihood is a sum of a
few log-softmax values of ~4,096 logits; the two implementations differ only
in operation order (fused SDPA vs eager attention, RoPE as complex vs real
rotations), each a few fp32 roundings (2^-24 ~ 6e-8 relative) of values of
size ~10, through 4 layers: ~1e-5 at most. 1e-4 is the issue's bound and
leaves a margin of ten.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from support import TINY_TOKENIZER
from support.eval import EVAL_TASKS, MC_TASK, QA_TASK, write_hf_tokenizer
from support.hf import TINY_FLAVOR_CONFIG, save_random_llama

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from swallow_titan.hf.config import model_args_from_hf_config, read_hf_config  # noqa: E402
from swallow_titan.hf.weights import load_hf_weights  # noqa: E402
from swallow_titan.data.tokenizer import Llama3Tokenizer  # noqa: E402
from swallow_titan.eval.adapter import ModelRunner, SwallowLM  # noqa: E402
from swallow_titan.model.transformer import (  # noqa: E402
    FusedLossOutput,
    FusedNormBlock,
    SwallowTransformer,
)

MAX_LENGTH = 256
TOLERANCE = 1e-4  # see the module docstring


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory) -> Path:
    folder = save_random_llama(tmp_path_factory.mktemp("hf") / "tiny", TINY_FLAVOR_CONFIG)
    write_hf_tokenizer(folder, TINY_TOKENIZER)
    return folder


class CountingModel(torch.nn.Module):
    """The model, counting forward passes (proves the adapter ran it)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(tokens)


def swallow_lm(
    folder: Path, max_length: int = MAX_LENGTH, batch_size: int = 4, **kernels: str
) -> SwallowLM:
    args = model_args_from_hf_config(read_hf_config(folder), str(folder))
    model = SwallowTransformer(replace(args, max_seq_len=max_length, **kernels))
    load_hf_weights([model], folder, model.model_args)
    counting = CountingModel(model.eval())
    runner = ModelRunner(forward=counting, device=torch.device("cpu"))
    return SwallowLM(runner, Llama3Tokenizer(folder), max_length=max_length, batch_size=batch_size)


def hf_lm(folder: Path, max_length: int = MAX_LENGTH) -> HFLM:
    return HFLM(
        pretrained=str(folder), dtype="float32", device="cpu", batch_size=1,
        add_bos_token=True, max_length=max_length,
    )


def evaluate(lm) -> dict:
    return simple_evaluate(
        model=lm,
        tasks=[MC_TASK, QA_TASK],
        task_manager=TaskManager(include_path=str(EVAL_TASKS), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )


@pytest.fixture(scope="module")
def both(hf_tiny):
    ours = swallow_lm(hf_tiny)
    mp = pytest.MonkeyPatch()
    mp.chdir(EVAL_TASKS.parent.parent)  # the task files' data paths are relative to the repo
    try:
        return evaluate(ours), evaluate(hf_lm(hf_tiny)), ours
    finally:
        mp.undo()


def by_doc(results: dict, task: str) -> dict[int, dict]:
    return {s["doc_id"]: s for s in results["samples"][task]}


def test_tokenizers_agree_on_the_task_text(hf_tiny):
    """Precondition of the comparison: both sides see the same token ids."""
    from transformers import AutoTokenizer

    ours, theirs = Llama3Tokenizer(hf_tiny), AutoTokenizer.from_pretrained(hf_tiny)
    for path in (EVAL_TASKS / "data").glob("*.jsonl"):
        text = path.read_text(encoding="utf-8")
        assert ours.encode(text, add_bos=True) == theirs.encode(text)


def test_the_adapter_ran_the_swallow_model(both):
    _, _, ours = both
    assert ours.runner.forward.calls > 0


def test_multiple_choice_loglikelihoods_equal_the_hf_model(both):
    mine, ref, _ = both
    ours, theirs = by_doc(mine, MC_TASK), by_doc(ref, MC_TASK)
    assert sorted(ours) == sorted(theirs) == list(range(12))
    lls = []
    for doc_id, sample in ours.items():
        for (ll, greedy), (ref_ll, ref_greedy) in zip(
            [r[0] for r in sample["resps"]], [r[0] for r in theirs[doc_id]["resps"]], strict=True
        ):
            assert abs(ll - ref_ll) <= TOLERANCE, (doc_id, ll, ref_ll)
            assert greedy == ref_greedy
            lls.append(ll)
    assert len(set(round(x, 3) for x in lls)) > 10  # real, distinct scores


def test_multiple_choice_accuracy_equals_the_hf_model(both):
    mine, ref, _ = both
    for metric in ("acc,none", "acc_norm,none"):
        assert mine["results"][MC_TASK][metric] == ref["results"][MC_TASK][metric]


def test_greedy_generations_equal_the_hf_model(both):
    mine, ref, _ = both
    ours, theirs = by_doc(mine, QA_TASK), by_doc(ref, QA_TASK)
    assert sorted(ours) == sorted(theirs) == list(range(8))
    generations = []
    for doc_id, sample in ours.items():
        assert sample["resps"] == theirs[doc_id]["resps"], doc_id
        generations.append(sample["resps"][0][0])
    assert any(generations)  # the random model does write something
    assert mine["results"][QA_TASK] == ref["results"][QA_TASK]


def test_rolling_loglikelihood_equals_the_hf_model_across_windows(hf_tiny):
    """Texts longer than the model's length are scored in lm-eval's rolling windows."""
    text = (EVAL_TASKS / "data" / "ja_mc_test.jsonl").read_text(encoding="utf-8")
    requests = [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0)
        for t in (text, text[:200])
    ]
    ours = swallow_lm(hf_tiny, max_length=64, batch_size=3).loglikelihood_rolling(requests)
    theirs = hf_lm(hf_tiny, max_length=64).loglikelihood_rolling(requests)
    assert len(Llama3Tokenizer(hf_tiny).encode(text)) > 3 * 64  # several windows
    for a, b in zip(ours, theirs, strict=True):
        # A sum over ~1,000 tokens: fp32 differences add up to ~1e-5 per token.
        assert abs(a - b) <= TOLERANCE * max(1.0, abs(b) / 100), (a, b)


def test_evaluate_cli_on_the_hf_folder_gives_the_same_results(hf_tiny, both, capsys, monkeypatch):
    from swallow_titan.evaluate import main

    monkeypatch.chdir(EVAL_TASKS.parent.parent)
    code = main([
        str(hf_tiny), "--tasks", f"{MC_TASK},{QA_TASK}", "--include-path", str(EVAL_TASKS),
        "--max-length", str(MAX_LENGTH), "--max-gen-toks", "16", "--batch-size", "5", "--json",
    ])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    mine, ref, _ = both
    assert printed["results"] == mine["results"]
    assert printed["results"][MC_TASK]["acc,none"] == ref["results"][MC_TASK]["acc,none"]


def test_the_triton_kernels_give_the_same_scores_and_answers(hf_tiny):
    """[kernels] on (fused RMSNorm, fused output loss layer): the adapter reads logits alike.

    Under Triton's interpreter (tests/conftest.py). fp32 throughout; the kernels
    differ from torch only in summation order (RMSNorm's mean of squares), so the
    1e-4 bound of the module docstring holds.
    """
    context = "質問: 日本の首都はどこですか。\n答え:"
    scored = [
        Instance(request_type="loglikelihood", doc={}, arguments=(context, f" {a}"), idx=i)
        for i, a in enumerate(["東京", "大阪", "京都"])
    ]
    generated = [
        Instance(
            request_type="generate_until", doc={},
            arguments=(context, {"until": ["\n"], "max_gen_toks": 4}), idx=0,
        )
    ]
    plain = swallow_lm(hf_tiny, max_length=64)
    fused = swallow_lm(hf_tiny, max_length=64, rmsnorm_impl="triton", loss_impl="fused_linear_ce")
    assert isinstance(fused.runner.forward.model.output, FusedLossOutput)
    assert isinstance(fused.runner.forward.model.layers["0"], FusedNormBlock)
    for (a, greedy_a), (b, greedy_b) in zip(
        plain.loglikelihood(scored), fused.loglikelihood(scored), strict=True
    ):
        assert abs(a - b) <= TOLERANCE and greedy_a == greedy_b
    assert plain.generate_until(generated) == fused.generate_until(generated)


def test_evaluate_on_one_process_computes_as_training_does(hf_tiny, both, capsys, monkeypatch):
    """--dtype bfloat16 on one process: fp32 weights under autocast, as a one-GPU run's
    in-loop evaluation (torchtitan's ``maybe_enable_amp``), not a model cast to bf16.

    The same operations on the same numbers: the scores are equal. Against fp32 they
    differ by bf16's rounding (2^-8 relative per matmul input), far above 1e-4.
    """
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils

    from swallow_titan.evaluate import main

    monkeypatch.chdir(EVAL_TASKS.parent.parent)
    common = [
        str(hf_tiny), "--tasks", MC_TASK, "--include-path", str(EVAL_TASKS), "--limit", "4",
        "--max-length", str(MAX_LENGTH), "--max-gen-toks", "16", "--json", "--log-samples",
    ]
    assert main([*common, "--dtype", "bfloat16"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    one_device = ParallelDims(
        dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1
    )
    in_loop = swallow_lm(hf_tiny)
    model = in_loop.runner.forward

    def training_forward(tokens: torch.Tensor) -> torch.Tensor:
        with dist_utils.maybe_enable_amp(one_device, "bfloat16", "cpu"):
            return model(tokens)

    in_loop.runner.forward = training_forward
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reference = simple_evaluate(
        model=in_loop, tasks=[MC_TASK], limit=4, bootstrap_iters=0, log_samples=True,
        task_manager=TaskManager(include_path=str(EVAL_TASKS), include_defaults=False),
    )

    def scores(samples: list[dict]) -> list[float]:
        ordered = sorted((s for s in samples if s["doc_id"] < 4), key=lambda s: s["doc_id"])
        return [r[0][0] for s in ordered for r in s["resps"]]

    bf16 = scores(cli["samples"][MC_TASK])
    assert len(bf16) == 4 * 4  # four examples, four choices
    assert bf16 == scores(reference["samples"][MC_TASK])
    fp32 = scores(both[0]["samples"][MC_TASK])  # the fp32 evaluation of the same examples
    assert max(abs(a - b) for a, b in zip(bf16, fp32, strict=True)) > 1e-3
