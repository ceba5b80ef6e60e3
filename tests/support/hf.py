"""Small random Llama models built and saved with transformers, as HF folders to import.

The configurations are written out by hand (not produced by swallow-titan's
code), as a user's HF folder would be.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from support import TINY_TOKENIZER


# Llama-3.1's RoPE (theta 500,000; llama3 scaling 8 / 1 / 4 / 8192).
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# The registered `tiny` flavor as an HF config (dim 256, 4 layers, 8 heads,
# 2 KV heads, SwiGLU 704, vocab 4096 = the shipped tokenizer, eps 1e-5).
TINY_FLAVOR_CONFIG = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    rope_parameters=LLAMA31_ROPE,
    tie_word_embeddings=False,
    bos_token_id=3840,
    eos_token_id=3841,
)

# No registered flavor: other sizes, an FFN size off torchtitan's rounding
# grid, and unusual RoPE scaling values (so swapped fields would show).
ODD_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 100000.0,
        "factor": 16.0,
        "low_freq_factor": 2.0,
        "high_freq_factor": 8.0,
        "original_max_position_embeddings": 256,
    },
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def save_random_llama(folder: Path, config: dict, **options: Any) -> Path:
    """A random ``LlamaForCausalLM`` saved by transformers (sharded, with index).

    ``options``: those of :func:`save_random` (dtype, shard size, seed, tokenizer).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    return save_random(lambda: LlamaForCausalLM(LlamaConfig(**config)), folder, **options)


def save_random(
    build: Callable[[], Any],
    folder: Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "200KB",
    seed: int = 0,
    tokenizer: Path | None = TINY_TOKENIZER,
) -> Path:
    """The transformers model ``build()`` makes after seeding torch with ``seed``,
    saved in ``dtype`` (sharded, with index), with the tokenizer file beside it."""
    torch.manual_seed(seed)
    model = build()
    model.to(dtype).save_pretrained(folder, max_shard_size=max_shard_size)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, folder / tokenizer.name)
    return folder


def safetensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder's safetensors files, by name."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def drop_tensor(folder: Path, name: str) -> None:
    """Delete one tensor from a single-file HF folder (``model.safetensors``)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors[name]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def assert_same_tensors(
    one: Path, two: Path, *, atol: float = 0.0, dtype: torch.dtype | None = None,
    norm_rtol: float | None = None,
) -> None:
    """Two HF folders hold tensors of the same names and dtypes, equal to ``atol``
    (default: bit-identical); with ``dtype``, every one of them in that dtype.
    With ``norm_rtol``, each tensor instead differs by at most ``norm_rtol`` of
    its norm (for trained weights, where Adam can move an element whose
    gradient is rounding noise by up to ~lr)."""
    a, b = safetensors_of(one), safetensors_of(two)
    assert sorted(a) == sorted(b)
    for name in a:
        if dtype is not None:
            assert b[name].dtype == dtype, name
        if norm_rtol is not None:
            assert (b[name] - a[name]).norm() <= norm_rtol * a[name].norm(), name
            continue
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_loads_cleanly_in_transformers(folder: Path) -> None:
    """transformers loads the folder with no missing, unexpected or mismatched
    keys, no errors and no warning in its log."""
    import io
    import logging

    from transformers import AutoModelForCausalLM

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        _, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    finally:
        transformers_logger.removeHandler(handler)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    assert stream.getvalue() == "", stream.getvalue()


def token_ids(vocab: int, seq_len: int) -> torch.Tensor:
    """Two rows of ``seq_len`` random token ids below ``vocab`` (the same ones every call)."""
    return torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(1))


def transformers_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """The logits transformers' own model of an HF folder gives for ``ids``, in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def rewrite_config(folder: Path, **changes) -> None:
    """Edit config.json in place (``None`` deletes a key)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))


def as_transformers4_config(folder: Path) -> None:
    """Rewrite config.json in the Hub's Llama-3.1 spelling (rope_theta + rope_scaling)."""
    config = json.loads((folder / "config.json").read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope.get("rope_type") != "default" else None
    config["torch_dtype"] = config.pop("dtype", "float32")
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """fp32 logits of two implementations of the same model agree to 64 ulps.

    Both sides compute in fp32 from the same weights; they differ only in the
    order of summation and in how ops are decomposed, which moves a logit by
    a few units in the last place of the logits' scale (2 ulps measured on
    these models). 64 ulps of the largest logit leaves a wide margin and is
    still several times below what a real mapping bug gives: doubling the
    llama3 RoPE scaling factor moves the logits by 4.5e-5 (tiny flavor, 64
    tokens) and 1.1e-4 (ODD_CONFIG, 48 tokens), against 64 ulps ~ 6e-6 at a
    scale of 0.8 (test_hf_interop checks that it fails).
    """
    tolerance = logits_tolerance(theirs)
    difference = (ours - theirs).abs().max().item()
    assert difference <= tolerance, f"logits differ by {difference:.3g} > {tolerance:.3g}"


def logits_tolerance(reference: torch.Tensor) -> float:
    """64 fp32 ulps of the largest reference logit (see :func:`assert_same_logits`)."""
    return 64 * torch.finfo(torch.float32).eps * reference.abs().max().item()


# The transformers 4.x release the export is checked against (its last line).
TRANSFORMERS4 = "transformers==4.57.6"


def transformers4_python() -> str:
    """A Python that imports transformers 4.x and this environment's torch.

    ``SWALLOW_TRANSFORMERS4_PYTHON`` if set; else a small virtual environment
    made once per machine in the user's cache folder: ``TRANSFORMERS4`` and its
    own dependencies installed with pip from the configured package index, the
    rest (torch, safetensors, ...) taken from this environment through a
    ``.pth`` file placed after its own packages. About 35 s and 180 MB the first
    time.
    """
    if os.environ.get("SWALLOW_TRANSFORMERS4_PYTHON"):
        return os.environ["SWALLOW_TRANSFORMERS4_PYTHON"]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swallow-titan"
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    venv = cache / f"{TRANSFORMERS4.replace('==', '-')}-{version}"
    python = venv / "bin" / "python"
    if python.exists():
        return str(python)
    cache.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed into place: a half-made environment is never used.
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(staging)], check=True)
    site = next((staging / "lib").glob("python*/site-packages"))
    (site / "zz_swallow_titan_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run(
        [str(staging / "bin" / "python"), "-m", "pip", "install", "-q", TRANSFORMERS4],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(
            f"could not install {TRANSFORMERS4} for the transformers 4.x check "
            f"(set SWALLOW_TRANSFORMERS4_PYTHON to a Python that has it):\n{proc.stderr[-2000:]}"
        )
    try:
        staging.rename(venv)
    except OSError:  # another session finished first
        shutil.rmtree(staging, ignore_errors=True)
    return str(python)


# The registered Qwen3 `tiny` flavor as an HF config: head_dim 32 with hidden
# 128 and 8 heads (q is 256 wide: head_dim decoupled from hidden / heads), GQA,
# tied embeddings, theta 1e6, vocab 4096 = the shipped tokenizer.
QWEN3_TINY_CONFIG = dict(
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=True,
    bos_token_id=3840,
    eos_token_id=3841,
)

# The registered `tiny_moe` flavor as an HF Qwen3-MoE config: 8 experts of
# width 64, 2 per token with renormalised weights, untied embeddings.
QWEN3_MOE_TINY_CONFIG = dict(
    {k: v for k, v in QWEN3_TINY_CONFIG.items() if k != "tie_word_embeddings"},
    tie_word_embeddings=False,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    router_aux_loss_coef=0.001,
)


def save_random_qwen3(folder: Path, config: dict, **options: Any) -> Path:
    """A random ``Qwen3ForCausalLM`` (or ``Qwen3MoeForCausalLM`` when ``config``
    has experts) saved by transformers (sharded, with index).

    transformers initialises every RMSNorm weight to 1, which would hide a
    mapping that swaps two norms (q_norm / k_norm, input / post-attention):
    they are drawn from 1 + 0.2 N(0, 1) instead. ``options``: those of
    :func:`save_random`.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    def build():
        if "num_experts" in config:
            model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**config))
        else:
            model = Qwen3ForCausalLM(Qwen3Config(**config))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
        return model

    return save_random(build, folder, **options)
