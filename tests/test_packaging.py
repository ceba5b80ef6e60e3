"""Installation facts: device selection and the `kernels` name clash with transformers."""

from __future__ import annotations

import subprocess
import sys

from support import REPO


def test_torchtitan_runs_on_cpu_when_no_gpu_is_present():
    import torch

    import swallow_titan
    from torchtitan.tools import utils

    if not torch.cuda.is_available():
        assert swallow_titan.DEVICE_TYPE == "cpu"
        assert utils.device_type == "cpu"
        assert utils.device_module.current_device() == 0


def test_transformers_does_not_mistake_our_kernels_package_for_hf_kernels():
    # A fresh interpreter, as a user would import transformers.
    code = (
        "import kernels, transformers\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,"
        " num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,"
        " vocab_size=128))\n"
        "print('kernels_available', is_kernels_available())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kernels_available False" in proc.stdout
