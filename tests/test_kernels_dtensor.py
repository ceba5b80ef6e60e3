"""The kernels on DTensors across 2 processes: sequence-parallel RMSNorm (partial
weight gradient), vocabulary-parallel and token-sharded fused cross-entropy.

The checks themselves are in ``dtensor_kernel_checks.py``, run with torchrun.
"""

from __future__ import annotations

import pytest

from support import REPO
from support.runs import run_checks_script

pytestmark = [pytest.mark.distributed]


def test_kernels_on_dtensors_match_single_process_references():
    run_checks_script(REPO / "tests" / "dtensor_kernel_checks.py", env={"TRITON_INTERPRET": "1"})
