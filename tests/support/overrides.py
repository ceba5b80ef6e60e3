"""Command-line override sets the tests share (``--section.field value`` pairs).

Each is a list to splice into a run's or a config's overrides:
``run_training(folder, *FSDP2, *KERNELS_ON, nproc=2)``.
"""

from __future__ import annotations

# Both Triton kernels on: the fused RMSNorm and the fused output-layer loss.
KERNELS_ON = ["--kernels.rmsnorm", "triton", "--kernels.loss", "fused_linear_ce"]

# Two processes, fully sharded data parallel (FSDP2).
FSDP2 = ["--parallelism.data_parallel_shard_degree", "2"]

# Two processes, tensor parallel only (no data-parallel sharding).
TP2 = [
    "--parallelism.tensor_parallel_degree", "2",
    "--parallelism.data_parallel_shard_degree", "1",
]
