"""bench/gpu_check.sh --dry-run on this CPU machine: every step runs (or is
recorded as skipped with its reason) and the JSON names each one; the GPU
figures themselves need the GPU machine."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["environment", "kernel_tests", "exactness", "kernel_bench", "engine_throughput"]


def test_dry_run_writes_every_step_into_out(tmp_path: Path) -> None:
    # GPU_CHECK_SHIM: map splitserve.* from the tree as on the GPU machine (no install there).
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_SHIM": "1"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] is True
    steps = {s["name"]: s for s in result["steps"]}
    assert list(steps) == STEPS
    for step in steps.values():
        assert step["status"] in ("passed", "skipped"), step
        if step["status"] == "skipped":
            assert step["reason"]
        for name in step["files"]:
            assert (tmp_path / name).is_file(), name
    assert not steps["environment"]["summary"]["splitserve"].startswith(str(ROOT))  # imported through the shim
    assert steps["kernel_tests"]["summary"]["tests"] > 0
    assert steps["kernel_tests"]["summary"]["failures"] == 0
    throughput = {r["system"] for r in steps["engine_throughput"]["summary"]["results"]}
    assert throughput == {"splitserve", "hf_generate"}
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
    assert len(list(tmp_path.iterdir())) <= 8  # the device machine returns at most 8 files
