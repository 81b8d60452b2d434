"""Time vLLM's offline ``LLM.generate`` on a bench workload.

Runs INSIDE the vLLM peer venv (it imports vllm; it must not import the
project)::

    <venv>/bin/python bench/peers/vllm_offline.py --model DIR \
        --workload engine.json --dtype float32 --threads 2 --out result.json

It reads an engine workload written by ``bench/workload.py`` (prompt token
ids, greedy, ``ignore_eos``), builds ``LLM`` (timed: startup), runs the whole
batch twice (cold, then warm), then one request alone (single-request
latency), and writes a JSON result: timings, output tok/s, per-request
latencies, peak RSS of this process tree, and the output token ids of the warm
run. ``bench/peers/vllm_runner.py`` is the project-side caller.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

RESULT_SCHEMA = "splitserve.bench.vllm_offline/v1"
ENGINE_SCHEMA = "splitserve.bench.engine_workload/v1"


def cpu_bind_for_threads(threads: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` value for ``threads`` threads on cores 0..threads-1."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return "0" if threads == 1 else f"0-{threads - 1}"


class RssSampler:
    """Samples the summed RSS of this process and its descendants (Linux /proc)."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(os.getpid()))
            self._stop.wait(self.interval_s)


def tree_rss_bytes(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def _latencies(outputs: list[Any], batch_start_mono: float, batch_end_mono: float) -> list[float] | None:
    """Per-request latency (queued -> last token) from vLLM's request metrics, if it kept them."""
    values = []
    for out in outputs:
        m = getattr(out, "metrics", None)
        queued = getattr(m, "queued_ts", 0.0) if m is not None else 0.0
        last = getattr(m, "last_token_ts", 0.0) if m is not None else 0.0
        if not queued or not last or last < queued:
            return None
        values.append(last - queued)
    return values


def _time_batch(llm: Any, prompts: list[Any], params: Any) -> dict[str, Any]:
    start = time.monotonic()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    end = time.monotonic()
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    n_out = sum(len(t) for t in token_ids)
    return {
        "elapsed_s": end - start,
        "output_tokens": n_out,
        "output_tok_s": n_out / (end - start),
        "latencies_s": _latencies(outputs, start, end),
        "token_ids": token_ids,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    workload = json.loads(Path(args.workload).read_text())
    if workload.get("schema") != ENGINE_SCHEMA:
        raise SystemExit(f"{args.workload}: not an engine workload (schema {workload.get('schema')!r})")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_bind_for_threads(args.threads))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    with RssSampler() as rss:
        t0 = time.monotonic()
        import vllm
        from vllm import LLM, SamplingParams

        max_len = max(len(r["prompt_token_ids"]) + r["max_tokens"] for r in workload["requests"])
        llm = LLM(
            model=args.model,
            dtype=args.dtype,
            max_model_len=max(args.max_model_len, max_len),
            enforce_eager=args.enforce_eager,
            seed=0,
            disable_log_stats=False,
        )
        startup_s = time.monotonic() - t0

        prompts = [{"prompt_token_ids": list(r["prompt_token_ids"])} for r in workload["requests"]]
        max_tokens = {r["max_tokens"] for r in workload["requests"]}
        if len(max_tokens) != 1:
            raise SystemExit("this runner expects one max_tokens for all requests")
        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens.pop(),
            ignore_eos=bool(workload["ignore_eos"]),
            detokenize=False,
        )
        cold = _time_batch(llm, prompts, params)
        warm = _time_batch(llm, prompts, params)
        single = _time_batch(llm, prompts[:1], params)

    cold.pop("token_ids")
    single.pop("token_ids")
    warm_ids = warm.pop("token_ids")
    return {
        "schema": RESULT_SCHEMA,
        "vllm_version": vllm.__version__,
        "model": str(args.model),
        "dtype": args.dtype,
        "threads": args.threads,
        "cpu_bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
        "enforce_eager": args.enforce_eager,
        "workload": workload["name"],
        "num_requests": len(prompts),
        "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts),
        "startup_s": startup_s,
        "cold": cold,
        "warm": warm,
        "single_request_latency_s": single["elapsed_s"],
        "single_request_prompt_tokens": len(prompts[0]["prompt_token_ids"]),
        "peak_rss_bytes": rss.peak_bytes,
        "self_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "output_token_ids": warm_ids,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time vLLM offline generate on a bench workload.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--workload", required=True)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (whole GiB)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = run(args)
    Path(args.out).write_text(json.dumps(result))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
