"""The first-GPU-run script is checked on CPU: arguments, time plan, tree-killing timeouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import swallow_titan  # noqa: F401  (device selection before torchtitan loads)
from support import REPO

from benchmarks import gpu_e2e
from benchmarks.gpu_e2e import CACHE_VARIABLES, COLD, WARM, phase_seconds, run_env, stage_seconds
from benchmarks.proctree import run_with_timeout


def test_gpu_run_check_passes_on_cpu_without_wheels():
    # The wheels (benchmarks/fetch_wheels.sh) are not in CI; everything else is.
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_run.sh", "--check-no-wheels"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=without_caches(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for stage in ("e2e", "kernels", "throughput"):
        assert f"  {stage}: ok" in proc.stdout
    assert "check: ok" in proc.stdout
    # every stage gets gpu_e2e.py's compile caches, and the plan fits the lease
    for line in gpu_e2e_exports():
        assert "  " + line.removeprefix("export ") in proc.stdout
    assert "e2e: 20 steps" in proc.stdout and "of 900 s" in proc.stdout


def gpu_e2e_exports() -> list[str]:
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_e2e.py", "--print-caches"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=without_caches(),
    )
    return proc.stdout.splitlines()


def without_caches() -> dict[str, str]:
    """This environment less the compile-cache variables (the test session sets its own)."""
    return {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}


def test_a_budget_that_does_not_fit_the_lease_fails_the_check():
    # The e2e limit follows its budget: 60 steps need more than the script has.
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_run.sh", "--check-plan"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**without_caches(), "E2E_STEPS": "60"},
    )
    assert proc.returncode == 1 and "does not fit" in proc.stdout
    assert "e2e: 60 steps" in proc.stdout and f" {stage_seconds(60)} " in proc.stdout


def test_e2e_runs_get_the_cold_then_warm_budget_and_share_the_caches(tmp_path, monkeypatch):
    runs = []

    def fake_train(name, overrides, dump, timeout, log):
        runs.append((name, timeout, {v: run_env()[v] for v in CACHE_VARIABLES}))
        return {"exit": 0, "seconds": 0.0, "timeout": timeout, "phases": {},
                "losses": {1: 2.0, 2: 1.0}}

    for variable in CACHE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(gpu_e2e, "train", fake_train)
    assert gpu_e2e.main(["--out", str(tmp_path), "--steps", "2"]) == 0
    (on, cold, caches_on), (off, warm, caches_off) = runs
    assert (on, off) == ("kernels_on", "kernels_off")
    assert cold == COLD.timeout(2) > warm == WARM.timeout(2)
    assert cold + warm <= stage_seconds(2)  # what gpu_run.sh gives the stage
    assert caches_on == caches_off and len(set(caches_on.values())) == 2
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert report["kernels_on"]["timeout"] == cold


def test_the_smoke_compiles_flex_attention_without_max_autotune():
    import torch
    from torchtitan.distributed.utils import set_determinism
    from torchtitan.models.attention import FlexAttentionWrapper

    from swallow_titan.config.manager import load_job_config

    tuned = FlexAttentionWrapper._compiled_flex_attn
    assert tuned.get_compiler_config()["max_autotune"]  # torchtitan's default
    state = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        for autotune in (False, True):
            FlexAttentionWrapper._compiled_flex_attn = tuned
            config = load_job_config(gpu_e2e.BASE_CONFIG, gpu_e2e.recipe_path(2, 64, autotune))
            set_determinism(types.SimpleNamespace(world_size=1), torch.device("cpu"),
                            config.debug, distinct_seed_mesh_dims=["pp"])
            compiled = FlexAttentionWrapper._compiled_flex_attn
            assert compiled.get_compiler_config()["max_autotune"] is autotune
            if not autotune:  # ops without a deterministic kernel warn, not raise
                assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        FlexAttentionWrapper._compiled_flex_attn = tuned
        torch.use_deterministic_algorithms(state[0], warn_only=state[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[2:4]
        if state[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = state[4]


def test_measured_phases_come_from_torchtitans_log_times():
    log = "\n".join([
        "W1204 noise from torchrun",
        "[titan] 2026-12-04 07:00:00,000 - root - INFO - Starting job",
        "[titan] 2026-12-04 07:01:30,500 - root - INFO - \x1b[31mstep:  1/20  \x1b[32mloss:  12.1",
        "[titan] 2026-12-04 07:01:31,000 - root - INFO - validate step:  1  loss: 11.0",
        "[titan] 2026-12-04 07:01:40,750 - root - INFO - step: 20/20  loss:  7.5",
    ])
    assert phase_seconds(log) == {"to_first_step": 90.5, "steps": 10.25}
    assert phase_seconds(log.split("\n[titan] 2026-12-04 07:01:30")[0]) == {}  # no step yet


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_timeout_kills_a_grandchild_in_a_session_of_its_own(tmp_path):
    # As torchrun's workers: started with setsid, outside the launcher's group.
    pid_file = tmp_path / "pid"
    script = f"setsid sleep 120 & echo $! > {pid_file}; sleep 120"
    begin = time.monotonic()
    code, output = run_with_timeout(["bash", "-c", script], timeout=2)
    assert code == 124 and "TIMEOUT" in output
    assert time.monotonic() - begin < 30
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild)
