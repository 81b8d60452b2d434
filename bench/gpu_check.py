"""The one-shot GPU check (issue 20): every step time-boxed, results as JSON.

Steps, cheapest and most telling first; a failing or timed-out step is
recorded and the next one runs:

1. ``environment``: nvidia-smi, Python/torch/triton/transformers versions, the CUDA device;
2. ``kernel_tests``: ``pytest tests/kernels -m "not slow"`` compiled for the GPU (no
   TRITON_INTERPRET), junit XML;
3. ``exactness``: ``pytest tests/unit/test_exactness.py -m gpu`` (engine greedy vs
   transformers on CUDA with the Triton backend: fp32 token-identical, bf16 within a
   logit tolerance), junit XML;
4. ``kernel_bench``: ``bench/attention_kernels.py --json`` (decode/prefill vs SDPA and copy bandwidth);
5. ``engine_throughput``: ``bench/engine_throughput.py`` on the ~0.5B random Llama,
   256 offline requests, beside transformers ``generate_batch``.

Everything lands flat in ``--out`` (at most 8 files come back from the device
machine): ``gpu_check.json`` (one entry per step: status passed / failed /
timed_out / skipped with a reason, wall time, command, summary), ``gpu_check.log``
(every step's output) and each step's own file.

``--dry-run`` (for a machine with no GPU) runs the same steps on tiny shapes:
the kernel tests under TRITON_INTERPRET=1 on one file, the GPU-only steps as
skipped with the reason, the throughput bench on the small CPU model.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = "gpu_check.json"
LOG = "gpu_check.log"

ENV_PROBE = r"""
import json, platform, sys
facts = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
for name in ("torch", "triton", "transformers", "safetensors", "tokenizers", "pytest"):
    try:
        facts[name] = __import__(name).__version__
    except Exception as exc:  # a missing package is a fact, not a failure
        facts[name] = f"missing: {exc}"
import torch
facts["cuda_available"] = torch.cuda.is_available()
facts["torch_cuda"] = torch.version.cuda
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    facts.update(device_name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                 multiprocessors=props.multi_processor_count, memory_bytes=props.total_memory)
import splitserve.engine, splitserve.kernels.paged_attention
facts["splitserve"] = splitserve.__file__
print("GPU_CHECK_ENV " + json.dumps(facts))
"""


@dataclass
class Step:
    """One time-boxed command and what it left behind."""

    name: str
    command: list[str]
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # written into --out by the command
    skip_reason: str | None = None  # known before running: recorded, command not run
    fallback_reason: str | None = None  # it ran, but not the GPU measurement: recorded as skipped
    status: str = "pending"
    reason: str = ""
    rc: int | None = None
    wall_s: float = 0.0
    summary: dict[str, object] = field(default_factory=dict)


def _junit_summary(path: Path) -> dict[str, object]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed, skip_reasons = [], set()
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        skipped = case.find("skipped")
        if skipped is not None:
            skip_reasons.add(skipped.get("message", ""))
    return {**counts, "failed": failed[:50], "skip_reasons": sorted(skip_reasons)[:10]}


def _run(step: Step, out: Path, log) -> None:
    log.write(f"\n===== {step.name}: {' '.join(step.command)} (timeout {step.timeout_s:.0f} s)\n")
    log.flush()
    env = {**os.environ, **step.env}
    if step.env.get("TRITON_INTERPRET") is None:
        env.pop("TRITON_INTERPRET", None)
    start = time.monotonic()
    proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=step.timeout_s)
        step.rc = proc.returncode
        step.status = "passed" if proc.returncode == 0 else "failed"
        if step.status == "passed" and step.fallback_reason:
            step.status, step.reason = "skipped", step.fallback_reason
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its pytest/bench children too
        output, _ = proc.communicate()
        step.status, step.reason = "timed_out", f"killed after {step.timeout_s:.0f} s"
    step.wall_s = round(time.monotonic() - start, 2)
    log.write(output or "")
    log.flush()
    step.summary = _summarise(step, out, output or "")
    if step.status == "failed" and not step.reason:
        step.reason = f"exit status {step.rc}; see {LOG}"


def _summarise(step: Step, out: Path, output: str) -> dict[str, object]:
    summary: dict[str, object] = {}
    for line in output.splitlines():
        if line.startswith("GPU_CHECK_ENV "):
            summary.update(json.loads(line[len("GPU_CHECK_ENV "):]))
    for name in step.files:
        path = out / name
        if not path.exists():
            summary.setdefault("missing_files", []).append(name)  # type: ignore[union-attr]
            continue
        try:
            if name.endswith(".xml"):
                summary.update(_junit_summary(path))
            elif name.endswith(".json"):
                data = json.loads(path.read_text())
                if "targets" in data:
                    summary.update(device=data.get("device"), copy_bandwidth_bytes_per_s=data.get(
                        "copy_bandwidth_bytes_per_s"), rows=len(data.get("rows", [])), targets=data["targets"])
                if "results" in data:
                    summary["results"] = [{k: r.get(k) for k in ("system", "wall_s", "output_tokens_per_s",
                                                                 "errors", "agree_with_splitserve")}
                                          for r in data["results"]]
                    summary["model"] = {k: data["model"].get(k) for k in ("name", "num_parameters", "dtype")}
        except (ET.ParseError, json.JSONDecodeError, KeyError) as exc:
            summary["parse_error"] = f"{name}: {exc}"
    if step.status == "passed" and summary.get("tests") and summary.get("skipped") == summary.get("tests"):
        step.status = "skipped"
        step.reason = "; ".join(summary.get("skip_reasons", [])) or "every test skipped"  # type: ignore[arg-type]
    return summary


def plan(out: Path, dry_run: bool, python: str, cuda: bool, xdist: bool = False) -> list[Step]:
    """The steps in order; ``dry_run`` shrinks them to seconds on a CPU. The time
    boxes add up to 495 s, inside bench/gpu_check.sh's 500 s cap, so a rerun
    still fits the device machine's 15 minutes."""
    interp = {"TRITON_INTERPRET": "1"} if dry_run else {}
    no_gpu = None if cuda else "no CUDA device on this machine"
    kernel_targets = ["tests/kernels/test_kernels_rms_norm.py"] if dry_run else ["tests/kernels"]
    # -v: the log keeps each test's outcome even if the time box kills pytest before its junit XML.
    pytest = [python, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--timeout", "60"]
    # Kernel compiles dominate on the GPU; the device machine has 16 cores and pytest-xdist.
    parallel = ["-n", "8"] if xdist and not dry_run else []
    steps = [
        Step("environment", [python, "-c", ENV_PROBE], 30),
        Step("kernel_tests", [*pytest, *parallel, *kernel_targets, "-m", "not slow",
                              "--junitxml", str(out / "kernel_tests.xml")], 120, interp, ["kernel_tests.xml"]),
        Step("exactness", [*pytest, "tests/unit/test_exactness.py", "-m", "gpu",
                           "--junitxml", str(out / "exactness.xml")], 75, interp, ["exactness.xml"]),
    ]
    if dry_run and not cuda:
        # bench/attention_kernels.py without CUDA runs its interpreter smoke test only (no JSON).
        steps.append(Step("kernel_bench", [python, "bench/attention_kernels.py", "--quick"], 120, interp,
                          fallback_reason="no CUDA device: ran the interpreter smoke test only, no timings"))
    else:
        steps.append(Step("kernel_bench", [python, "bench/attention_kernels.py", *(["--quick"] if dry_run else []),
                                           "--json", str(out / "kernel_bench.json")], 150, {},
                          ["kernel_bench.json"], skip_reason=no_gpu))
    fallback = None
    if cuda and not dry_run:
        throughput = ["--model", "llama-0.5b", "--device", "cuda", "--num-requests", "256",
                      "--systems", "splitserve,hf_cb"]
    else:
        throughput = ["--model", "llama-56m", "--device", "cpu", "--num-requests", "4", "--max-tokens", "4",
                      "--systems", "splitserve,hf_generate"]
        fallback = "dry run: 4 requests on the small model on the CPU, not the GPU figure"
    steps.append(Step("engine_throughput", [python, "bench/engine_throughput.py", *throughput,
                                            "--json", str(out / "engine_throughput.json")], 120, interp,
                      ["engine_throughput.json"], fallback_reason=fallback))
    return steps


def _probe(python: str, expression: str) -> bool:
    probe = subprocess.run([python, "-c", f"print(bool({expression}))"], capture_output=True, text=True, timeout=120)
    return probe.stdout.strip().endswith("True")


def _nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,"
                               "temperature.gpu,power.draw", "--format=csv"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench/results/gpu_check"))
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU fallbacks (no GPU needed)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--only", default="", help="comma-separated step names (default: all)")
    ns = parser.parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cuda = _probe(ns.python, "__import__('torch').cuda.is_available()")
    xdist = _probe(ns.python, "__import__('importlib.util').util.find_spec('xdist')")
    steps = plan(ns.out, ns.dry_run, ns.python, cuda, xdist)
    wanted = {s.strip() for s in ns.only.split(",") if s.strip()}
    result: dict[str, object] = {"dry_run": ns.dry_run, "cuda": cuda, "started_unix": started,
                                 "nvidia_smi": _nvidia_smi(), "steps": []}
    with open(ns.out / LOG, "w") as log:
        for step in steps:
            if wanted and step.name not in wanted:
                step.status, step.reason = "skipped", "not in --only"
            elif step.skip_reason:
                step.status, step.reason = "skipped", step.skip_reason
            else:
                print(f"[gpu_check] {step.name} ...", flush=True)
                _run(step, ns.out, log)
            result["steps"].append(asdict(step))  # type: ignore[union-attr]
            result["wall_s"] = round(time.time() - started, 2)
            (ns.out / RESULT).write_text(json.dumps(result, indent=2) + "\n")  # after every step: a kill keeps the rest
    print(f"{'step':<18} {'status':<10} {'wall s':>7}  reason")
    for step in steps:
        print(f"{step.name:<18} {step.status:<10} {step.wall_s:>7.1f}  {step.reason}")
    print(f"[gpu_check] total {result['wall_s']} s; wrote {ns.out / RESULT}")
    return 0 if all(s.status in ("passed", "skipped") for s in steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
