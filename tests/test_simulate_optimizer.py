"""Issue 19, item 3: fused/foreach AdamW "peaks" at ~16 bytes/parameter on a 64-rank fake mesh.

Which is it: does the optimizer step over FSDP2's sharded DTensors materialise
full-size tensors (an out-of-memory on a cluster), or does the simulation count
something that is not there? These tests answer: the simulation mis-attributes.

- During the optimizer step no collective is issued, so no rank can obtain
  another rank's shard: nothing full-size can be materialised from the data,
  and the moments it creates are shard-sized (checked by arithmetic).
- The "peak" is DTensor's sharding propagation: for an op it has not seen, it
  runs the op once on fake tensors of the *global* shape, in the active fake
  mode. Under the simulation's fake mode the memory tracker counts those as this
  rank's allocations; one fused ``_fused_adamw_`` call over all parameters then
  holds params, grads and both moments at full size at once: 4 x 4 = 16 bytes
  per parameter. With
  :func:`swallow_titan.runtime.seams.dtensor_propagation_in_own_fake_mode` the
  propagation runs in a fake mode of its own and the step's peak is the
  sharded arithmetic.

Each measurement uses layer widths no other measurement uses: DTensor caches
propagation per op signature, and a cached op would propagate nothing.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from swallow_titan.runtime.seams import dtensor_propagation_in_own_fake_mode
from swallow_titan.simulate import CollectiveRecorder

WORLD = 64
LAYERS = 3


@pytest.fixture
def fake_world():
    """A 64-rank fake process group (this process is rank 0), torn down after."""
    assert not dist.is_initialized()
    dist.init_process_group("fake", rank=0, world_size=WORLD, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (WORLD,), mesh_dim_names=("fsdp",))
    finally:
        dist.destroy_process_group()


def _optimizer_step(mesh, width: int, implementation: str, own_mode: bool):
    """One AdamW step after one backward on a sharded MLP; what it cost rank 0.

    Returns (peak bytes during the step above the bytes before it, the state's
    bytes after it, collectives issued during the step, full parameter count).
    """
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        with torch.device("meta"):
            model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(LAYERS)])
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        n_params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=1e-3,
            fused=implementation == "fused",
            foreach=implementation == "foreach",
        )
        model(torch.randn(4, width)).sum().backward()
        # Tracked from here: it starts from the live parameters and gradients.
        tracker = FSDPMemTracker(model, optimizer)
        recorder = CollectiveRecorder({}, ngpu=8)
        context = dtensor_propagation_in_own_fake_mode() if own_mode else contextlib.nullcontext()
        with context, tracker:
            before = sum(s["Total"] for s in tracker.get_tracker_snapshot("current").values())
            with recorder:
                optimizer.step()
            peak = max(s["Total"] for s in tracker.get_tracker_snapshot("peak").values())
        state = sum(
            v.to_local().untyped_storage().nbytes()
            for s in optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        )
    return peak - before, state, recorder.records, n_params


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_optimizer_peak_is_propagation_not_materialisation(fake_world, implementation):
    # Distinct widths per measurement (see the module docstring).
    base = 128 * 8 if implementation == "fused" else 128 * 12
    raw_extra, raw_state, raw_comms, n = _optimizer_step(fake_world, base, implementation, False)
    own_extra, own_state, own_comms, n2 = _optimizer_step(
        fake_world, base + 64, implementation, True
    )
    # 1. Nothing is gathered during the step, with or without the fix.
    assert raw_comms == {} and own_comms == {}

    # 2. The state it created is the shard's: two fp32 moments of ceil(width / 64)
    #    rows of each (width x width) weight.
    def sharded_moments(width: int) -> int:
        return LAYERS * 2 * math.ceil(width / WORLD) * width * 4

    assert raw_state == sharded_moments(base)
    assert own_state == sharded_moments(base + 64)

    # 3. Without the fix the tracker "sees" global-shape tensors: the fused op's
    #    propagation holds params, grads and both moments at full size (16 B/param);
    #    foreach's largest op holds three lists (12 B/param).
    full_lists = 4 if implementation == "fused" else 3
    assert raw_extra >= full_lists * 4 * n

    # 4. With the fix the step costs at most the new moments plus one shard-sized
    #    temporary per state tensor (foreach AdamW's intermediate lists).
    sharded_param_bytes = LAYERS * math.ceil((base + 64) / WORLD) * (base + 64) * 4
    assert own_extra <= own_state + 2 * sharded_param_bytes
    assert own_extra < full_lists * 4 * n2 / 8
