"""Project-venv side of the vLLM offline peer benchmark.

:func:`run_vllm_offline` writes the workload as JSON, runs
``bench/peers/vllm_offline.py`` with the peer venv's python (its own process
group, stopped by pid on timeout or Ctrl-C, caches in a temp dir that is
removed afterwards) and parses its JSON into :class:`VllmOfflineResult`.

CLI (prints a table)::

    python bench/peers/vllm_runner.py [--quick] [--dtype float32 bfloat16] [--threads 2] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers import vllm_env  # noqa: E402
from bench.peers.procs import start_process_group, stop_process_group  # noqa: E402
from bench.workload import EngineWorkload, engine_workload  # noqa: E402

OFFLINE_SCRIPT = Path(__file__).resolve().with_name("vllm_offline.py")
RESULT_SCHEMA = "splitserve.bench.vllm_offline/v1"


class PeerRunError(RuntimeError):
    """The vLLM peer run failed; the message carries its log's tail."""


@dataclass(frozen=True)
class BatchTiming:
    """One timed ``LLM.generate`` over the whole workload."""

    elapsed_s: float
    output_tokens: int
    output_tok_s: float
    latency_p50_s: float | None
    latency_p99_s: float | None


@dataclass(frozen=True)
class VllmOfflineResult:
    """vLLM offline results for one (model, dtype, threads, workload)."""

    vllm_version: str
    model: str
    dtype: str
    threads: int
    cpu_bind: str
    enforce_eager: bool
    workload: str
    num_requests: int
    prompt_tokens: int
    startup_s: float
    cold: BatchTiming
    warm: BatchTiming
    single_request_latency_s: float
    peak_rss_bytes: int
    output_token_ids: tuple[tuple[int, ...], ...]

    def summary(self) -> dict[str, Any]:
        """Everything but the token ids (for tables and JSON reports)."""
        data = asdict(self)
        data.pop("output_token_ids")
        return data


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


def _batch(data: dict[str, Any]) -> BatchTiming:
    lat = data.get("latencies_s")
    return BatchTiming(
        elapsed_s=float(data["elapsed_s"]),
        output_tokens=int(data["output_tokens"]),
        output_tok_s=float(data["output_tok_s"]),
        latency_p50_s=_percentile(lat, 50) if lat else None,
        latency_p99_s=_percentile(lat, 99) if lat else None,
    )


def parse_offline_result(data: dict[str, Any]) -> VllmOfflineResult:
    """Parse the JSON written by ``vllm_offline.py``; raises ValueError if it is not one."""
    if data.get("schema") != RESULT_SCHEMA:
        raise ValueError(f"not a vLLM offline result (schema {data.get('schema')!r}, expected {RESULT_SCHEMA!r})")
    try:
        return VllmOfflineResult(
            vllm_version=str(data["vllm_version"]),
            model=str(data["model"]),
            dtype=str(data["dtype"]),
            threads=int(data["threads"]),
            cpu_bind=str(data["cpu_bind"]),
            enforce_eager=bool(data["enforce_eager"]),
            workload=str(data["workload"]),
            num_requests=int(data["num_requests"]),
            prompt_tokens=int(data["prompt_tokens"]),
            startup_s=float(data["startup_s"]),
            cold=_batch(data["cold"]),
            warm=_batch(data["warm"]),
            single_request_latency_s=float(data["single_request_latency_s"]),
            peak_rss_bytes=int(data["peak_rss_bytes"]),
            output_token_ids=tuple(tuple(int(t) for t in ids) for ids in data["output_token_ids"]),
        )
    except KeyError as exc:
        raise ValueError(f"vLLM offline result lacks field {exc}") from None


def peer_env(tmp: Path, threads: int, kv_cache_gib: int = 2) -> dict[str, str]:
    """Environment for a vLLM CPU child: thread binding, KV space, caches under ``tmp``, offline."""
    bind = "0" if threads == 1 else f"0-{threads - 1}"
    env = dict(os.environ)
    # The project venv must not leak into the peer's interpreter.
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(key, None)
    env.update(
        {
            "VLLM_CPU_OMP_THREADS_BIND": bind,
            "VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gib)),
            "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
            "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"),
            "VLLM_RPC_BASE_PATH": str(tmp / "rpc"),
            "TMPDIR": str(tmp),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
    )
    (tmp / "rpc").mkdir(parents=True, exist_ok=True)
    return env


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_vllm_offline(
    model_dir: Path,
    workload: EngineWorkload,
    dtype: str,
    threads: int,
    *,
    venv: Path | None = None,
    enforce_eager: bool = False,
    timeout_s: float = 3600.0,
    log_dir: Path | None = None,
) -> VllmOfflineResult:
    """Run vLLM's offline generate on ``workload`` in the peer venv and return its timings.

    The child runs in its own process group and is stopped (SIGTERM, then
    SIGKILL) on timeout or any exception; its caches live in a temp dir that is
    removed. The log is kept in ``log_dir`` if given.
    """
    python = vllm_env.python_path(venv)
    if not python.exists():
        raise PeerRunError(f"no vLLM peer venv ({python}); run `python bench/peers/vllm_env.py ensure`")
    tmp = Path(tempfile.mkdtemp(prefix="splitserve-vllm-"))
    try:
        wl_path = tmp / "workload.json"
        out_path = tmp / "result.json"
        log_path = (log_dir or tmp) / f"vllm-offline-{workload.name}-{dtype}-{threads}t.log"
        wl_path.write_text(json.dumps(workload.to_dict()))
        argv = [
            str(python), str(OFFLINE_SCRIPT), "--model", str(model_dir), "--workload", str(wl_path),
            "--dtype", dtype, "--threads", str(threads), "--out", str(out_path),
            "--max-model-len", str(max(2048, workload.max_seq_len)),
            "--enforce-eager" if enforce_eager else "--no-enforce-eager",
        ]
        proc = start_process_group(argv, env=peer_env(tmp, threads), log_path=log_path, cwd=tmp)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PeerRunError(
                f"vLLM offline run exceeded {timeout_s:.0f}s; log tail:\n{_tail(log_path)}"
            ) from None
        finally:
            stop_process_group(proc)
        if rc != 0 or not out_path.exists():
            raise PeerRunError(f"vLLM offline run failed (exit {rc}); log tail:\n{_tail(log_path)}")
        return parse_offline_result(json.loads(out_path.read_text()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def format_table(results: list[VllmOfflineResult]) -> str:
    """A plain-text table of the headline numbers."""
    header = (
        f"{'system':<14} {'workload':<13} {'dtype':<9} {'thr':>3} {'startup s':>9} "
        f"{'cold tok/s':>10} {'warm tok/s':>10} {'p50 lat s':>9} {'1-req s':>8} {'peak RSS GiB':>12}"
    )
    rows = [header, "-" * len(header)]
    for r in results:
        p50 = f"{r.warm.latency_p50_s:.2f}" if r.warm.latency_p50_s is not None else "-"
        rows.append(
            f"{'vllm ' + r.vllm_version:<14} {r.workload:<13} {r.dtype:<9} {r.threads:>3} {r.startup_s:>9.1f} "
            f"{r.cold.output_tok_s:>10.1f} {r.warm.output_tok_s:>10.1f} {p50:>9} "
            f"{r.single_request_latency_s:>8.2f} {r.peak_rss_bytes / 2**30:>12.2f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from bench.bench_models import DTYPES, LLAMA_56M, ensure_bench_model

    parser = argparse.ArgumentParser(description="vLLM CPU offline throughput on the bench workload.")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write summaries + token ids here")
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    workload = engine_workload(LLAMA_56M.vocab_size, quick=args.quick)
    results = []
    for dtype in args.dtype:
        model = ensure_bench_model(dtype)
        try:
            results.append(
                run_vllm_offline(model, workload, dtype, args.threads,
                                 enforce_eager=args.enforce_eager, log_dir=args.log_dir)
            )
        except PeerRunError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
