"""``engine_throughput.py --peer vllm``: splitserve and vLLM's CPU build, same workload, same run.

For each dtype, two child processes run the workload one after the other on
the same cores (``0..threads-1``): ``splitserve_offline.py`` (project venv)
and ``vllm_offline.py`` (peer venv, via :func:`run_vllm_offline`). Each
reports startup, a cold (first) and a warm batch, peak RSS of its process
tree and its warm greedy output ids. In float32 both are compared with each
other and with a transformers KV-cached argmax reference
(:func:`hf_greedy`, first ``agree_limit`` requests).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.peers.agreement import Agreement, token_agreement
from bench.peers.procs import start_process_group, stop_process_group
from bench.workload import EngineWorkload

SPLITSERVE_SCRIPT = Path(__file__).resolve().with_name("splitserve_offline.py")
SPLITSERVE_SCHEMA = "splitserve.bench.splitserve_offline/v1"
PEER_SCHEMA = "splitserve.bench.engine_peer/v1"


@dataclass(frozen=True)
class OfflineRun:
    """One system's offline run on the workload (either engine)."""

    system: str  # "splitserve" or "vllm <version>"
    dtype: str
    threads: int
    startup_s: float
    cold_tok_s: float
    warm_tok_s: float
    single_request_s: float
    peak_rss_bytes: int
    output_token_ids: tuple[tuple[int, ...], ...] = field(repr=False)


@dataclass(frozen=True)
class AgreementRow:
    """Greedy agreement of ``other`` against ``reference`` on the first ``requests`` requests."""

    dtype: str
    reference: str
    other: str
    requests: int
    exact: int
    prefix_fraction: float

    @property
    def text(self) -> str:
        return f"{self.exact}/{self.requests}"


@dataclass(frozen=True)
class EnginePeerReport:
    runs: tuple[OfflineRun, ...]
    agreement: tuple[AgreementRow, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PEER_SCHEMA,
            "runs": [{k: v for k, v in asdict(r).items() if k != "output_token_ids"} for r in self.runs],
            "agreement": [asdict(a) for a in self.agreement],
        }


def parse_splitserve_result(data: dict[str, Any]) -> OfflineRun:
    """Parse ``splitserve_offline.py``'s JSON; ValueError if it is not one."""
    if data.get("schema") != SPLITSERVE_SCHEMA:
        raise ValueError(f"not a splitserve offline result (schema {data.get('schema')!r})")
    try:
        return OfflineRun(
            system="splitserve", dtype=str(data["dtype"]), threads=int(data["threads"]),
            startup_s=float(data["startup_s"]), cold_tok_s=float(data["cold"]["output_tok_s"]),
            warm_tok_s=float(data["warm"]["output_tok_s"]),
            single_request_s=float(data["single_request_latency_s"]),
            peak_rss_bytes=int(data["peak_rss_bytes"]),
            output_token_ids=tuple(tuple(int(t) for t in ids) for ids in data["output_token_ids"]),
        )
    except KeyError as exc:
        raise ValueError(f"splitserve offline result lacks field {exc}") from None


def from_vllm(result: Any) -> OfflineRun:
    """An :class:`OfflineRun` from a ``VllmOfflineResult``."""
    return OfflineRun(
        system=f"vllm {result.vllm_version}", dtype=result.dtype, threads=result.threads,
        startup_s=result.startup_s, cold_tok_s=result.cold.output_tok_s, warm_tok_s=result.warm.output_tok_s,
        single_request_s=result.single_request_latency_s, peak_rss_bytes=result.peak_rss_bytes,
        output_token_ids=result.output_token_ids,
    )


def run_splitserve_offline(model_dir: Path, workload: EngineWorkload, dtype: str, threads: int,
                           timeout_s: float = 3600.0) -> OfflineRun:
    """Run ``splitserve_offline.py`` as a child (own process group, stopped by pid)."""
    tmp = Path(tempfile.mkdtemp(prefix="splitserve-offline-"))
    try:
        (tmp / "workload.json").write_text(json.dumps(workload.to_dict()))
        log = tmp / "log.txt"
        argv = [sys.executable, str(SPLITSERVE_SCRIPT), "--model", str(model_dir), "--workload",
                str(tmp / "workload.json"), "--dtype", dtype, "--threads", str(threads),
                "--out", str(tmp / "out.json")]
        proc = start_process_group(argv, log_path=log)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            stop_process_group(proc)
        if rc != 0 or not (tmp / "out.json").exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"splitserve offline run failed (exit {rc}); log tail:\n{tail}")
        return parse_splitserve_result(json.loads((tmp / "out.json").read_text()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def agreement_rows(dtype: str, named: dict[str, list[list[int]] | tuple[tuple[int, ...], ...]],
                   limit: int) -> list[AgreementRow]:
    """Every pair (reference first in ``named`` order) compared on the first ``limit`` requests."""
    names = list(named)
    rows = []
    for i, ref in enumerate(names):
        for other in names[i + 1:]:
            a: Agreement = token_agreement(list(named[ref])[:limit], list(named[other])[:limit])
            rows.append(AgreementRow(dtype, ref, other, a.requests, a.exact, round(a.prefix_fraction, 4)))
    return rows


def format_table(report: EnginePeerReport) -> str:
    header = (f"{'system':<16} {'dtype':<9} {'thr':>3} {'startup s':>9} {'cold tok/s':>10} "
              f"{'warm tok/s':>10} {'1-req s':>8} {'peak RSS GiB':>12}")
    lines = [header, "-" * len(header)]
    for r in report.runs:
        lines.append(f"{r.system:<16} {r.dtype:<9} {r.threads:>3} {r.startup_s:>9.1f} {r.cold_tok_s:>10.1f} "
                     f"{r.warm_tok_s:>10.1f} {r.single_request_s:>8.2f} {r.peak_rss_bytes / 2**30:>12.2f}")
    if report.agreement:
        lines.append("")
        lines.append("greedy agreement (exact requests, mean common-prefix fraction):")
        for a in report.agreement:
            lines.append(f"  {a.dtype:<9} {a.reference} vs {a.other}: {a.text} exact, prefix {a.prefix_fraction:.3f}")
    return "\n".join(lines)


def run_engine_peer(workload: EngineWorkload, dtypes: list[str], threads: int,
                    agree_limit: int = 8) -> EnginePeerReport:
    """splitserve then vLLM per dtype; fp32 agreement of both vs transformers and each other."""
    from bench.bench_models import ensure_bench_model
    from bench.peers.hf_reference import hf_greedy
    from bench.peers.vllm_runner import run_vllm_offline

    runs: list[OfflineRun] = []
    agreement: list[AgreementRow] = []
    for dtype in dtypes:
        model = ensure_bench_model(dtype)
        print(f"[peer] splitserve {dtype}, {threads} thread(s) ...", flush=True)
        ours = run_splitserve_offline(model, workload, dtype, threads)
        print(f"[peer] vLLM {dtype}, {threads} thread(s) (startup 50-90 s) ...", flush=True)
        theirs = from_vllm(run_vllm_offline(model, workload, dtype, threads))
        runs += [ours, theirs]
        if dtype == "float32":
            print(f"[peer] transformers reference, first {agree_limit} requests ...", flush=True)
            ref = hf_greedy(model, workload, dtype, limit=agree_limit, threads=threads)
            for run in (ours, theirs):
                agreement += agreement_rows(dtype, {"transformers": ref, run.system: run.output_token_ids},
                                            agree_limit)
        agreement += agreement_rows(dtype, {"splitserve": ours.output_token_ids,
                                            theirs.system: theirs.output_token_ids}, len(workload.requests))
    return EnginePeerReport(tuple(runs), tuple(agreement))


def main_peer(args: Any) -> int:
    """Entry from ``engine_throughput.py --peer vllm`` (its parsed args)."""
    from bench.bench_models import LLAMA_56M
    from bench.workload import engine_workload

    dtype = args.dtype or "both"
    if dtype not in ("float32", "bfloat16", "both"):
        raise SystemExit(f"--peer: --dtype must be float32, bfloat16 or both, not {dtype!r}")
    dtypes = ["float32", "bfloat16"] if dtype == "both" else [dtype]
    workload = engine_workload(LLAMA_56M.vocab_size, quick=args.quick, num_requests=args.num_requests,
                               max_tokens=args.max_tokens)
    print(f"model {LLAMA_56M.name}; workload {workload.name}: {len(workload.requests)} requests, "
          f"{workload.num_prompt_tokens} prompt tokens, {workload.max_tokens} output tokens each; "
          f"{args.threads} thread(s), cores 0..{args.threads - 1}", flush=True)
    report = run_engine_peer(workload, dtypes, args.threads)
    print(format_table(report))
    out = args.json or Path("bench/results/engine_peer.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {**report.to_dict(), "workload": {"name": workload.name, "num_requests": len(workload.requests),
                                             "prompt_tokens": workload.num_prompt_tokens,
                                             "max_tokens": workload.max_tokens}, "threads": args.threads}
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
