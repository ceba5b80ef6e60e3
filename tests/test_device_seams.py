"""The CUDA path is checked without CUDA: the device seams are listed, and a
process where torch reports CUDA gets none of the CPU shims.

``swallow_titan.runtime.seams.DEVICE_SEAMS`` lists every device-dependent behaviour
(checked with the other seams by ``seam_problems``, tests/test_seams.py).
The subprocess tests make torch report CUDA the way torch itself detects it
(``torch.cuda.is_available``, which ``torch._utils._get_available_device_type``
calls) before anything imports swallow_titan or torchtitan.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from support import REPO
from support.overrides import KERNELS_ON
from swallow_titan.runtime.seams import DEVICE_SEAMS

# What a device branch looks like in this code base.
_BRANCH = re.compile(
    r"device_type\s*[!=]=|DEVICE_TYPE\s*[!=]=|\.device\.type\b|\bis_cuda\b"
    r"|cuda\.is_available\(|uses_gloo\(|_get_available_device_type|\bINTERPRET\b"
)


def test_every_source_file_with_a_device_branch_is_listed():
    listed = {seam.where.split(":")[0] for seam in DEVICE_SEAMS}
    found = set()
    for folder in ("swallow_titan", "kernels"):
        for path in (REPO / folder).rglob("*.py"):
            code = "\n".join(
                line for line in path.read_text().splitlines()
                if not line.lstrip().startswith("#")
            )
            if _BRANCH.search(code):
                found.add(str(path.relative_to(REPO)))
    # The aot module compiles for CUDA on any machine: no branch on the device.
    found.discard("kernels/aot.py")
    assert found <= listed, f"device branches not in DEVICE_SEAMS: {sorted(found - listed)}"
    assert all((REPO / where).is_file() for where in listed)


# Run in a fresh process: prints what the device choice produced.
_PROBE = r"""
import json, os, sys
import torch
if os.environ["REPORT_CUDA"] == "1":
    torch.cuda.is_available = lambda: True   # how torch detects CUDA
    torch.cuda.device_count = lambda: 1
original = torch._utils._get_available_device_type
import swallow_titan
import swallow_titan.runtime.device as device
import torchtitan.tools.utils as titan
import torchtitan.train
from swallow_titan.config.manager import load_job_config
from swallow_titan.components.preflight import _check_float8, _check_kernels_device
from swallow_titan.components.profiling import available_activities, maybe_enable_profiling
from swallow_titan.runtime.seams import use_cpu_profiler_in_stock_trainer
use_cpu_profiler_in_stock_trainer()
config = load_job_config(sys.argv[1], [
    "--model.converters", "quantize.linear.float8", *sys.argv[2:],
])
refused = []
for check in (_check_float8, _check_kernels_device):
    try:
        check(config, "job.toml")
    except Exception as e:
        refused.append(check.__name__)
print(json.dumps({
    "swallow": swallow_titan.DEVICE_TYPE,
    "torchtitan": titan.device_type,
    "device_module": titan.device_module.__name__,
    "cpu_device_module": isinstance(titan.device_module, device.CpuDeviceModule),
    "device_type_patched": torch._utils._get_available_device_type is not original,
    "cpu_profiler": torchtitan.train.maybe_enable_profiling is maybe_enable_profiling,
    "cuda_activity": torch.profiler.ProfilerActivity.CUDA in available_activities(),
    "ngpu": device.default_ngpu(),
    "refused": refused,
}))
"""


def _probe(report_cuda: bool) -> dict:
    env = {
        **os.environ,
        "REPORT_CUDA": "1" if report_cuda else "0",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("TRITON_INTERPRET", None)  # as on a GPU machine
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(REPO / "train_configs" / "tiny_cpu.toml"), *KERNELS_ON],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="a real GPU: nothing to pretend"
)
def test_where_torch_reports_cuda_no_cpu_shim_is_installed():
    seen = _probe(report_cuda=True)
    assert seen["swallow"] == seen["torchtitan"] == "cuda"
    assert seen["device_module"] == "torch.cuda" and not seen["cpu_device_module"]
    assert not seen["device_type_patched"] and not seen["cpu_profiler"]
    assert seen["cuda_activity"] and seen["ngpu"] == 1
    # float8 without emulation and Triton without the interpreter are allowed.
    assert seen["refused"] == []


def test_where_torch_reports_no_cuda_the_cpu_shims_are_installed():
    seen = _probe(report_cuda=False)
    assert seen["swallow"] == seen["torchtitan"] == "cpu"
    assert seen["cpu_device_module"] and seen["device_type_patched"]
    assert seen["cpu_profiler"] and not seen["cuda_activity"]
    assert seen["refused"] == ["_check_float8", "_check_kernels_device"]
