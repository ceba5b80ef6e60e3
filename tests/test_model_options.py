"""Model options as a run builds them: flavors and float8 conversion, from the TOML."""

from __future__ import annotations

from dataclasses import replace

import torch
from torchtitan.distributed import ParallelDims
from torchtitan.protocols.model_converter import build_model_converters

from support.model import build_model
from swallow_titan.model.args import FLAVORS


def test_8b_proxy_is_8b_with_6_of_its_32_layers():
    assert FLAVORS["8B_proxy"] == replace(FLAVORS["8B"], n_layers=6)
    model, _ = build_model("--model.flavor", "8B_proxy", device="meta")
    assert len(model.layers) == 6
    # Llama-3.1-8B's shapes: embedding and output 128,256 x 4,096 (untied); per
    # layer q/o 4,096^2, k/v 4,096 x 1,024 (GQA 32/8), SwiGLU 3 x 4,096 x 14,336
    # and two norms; a final norm.
    dim, vocab, kv, ffn = 4096, 128_256, 1024, 14_336
    layer = 2 * dim * dim + 2 * dim * kv + 3 * dim * ffn + 2 * dim
    expected = 2 * vocab * dim + 6 * layer + dim
    assert sum(p.numel() for p in model.parameters()) == expected  # 2.36B


def test_float8_converts_every_linear_layer_but_the_filtered_output():
    from torchao.float8.float8_linear import Float8Linear

    model, config = build_model(
        "--model.converters", "quantize.linear.float8",
        "--quantize.linear.float8.emulate", "true",
        "--quantize.linear.float8.filter_fqns", "output",
    )
    dims = ParallelDims(
        dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1
    )
    build_model_converters(config, dims).convert(model)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # 7 projections per block (wq wk wv wo w1 w2 w3); the output layer stays high precision.
    assert len(converted) == 7 * len(model.layers)
    assert linears - converted == {"output"}
