"""Time splitserve's offline ``LLM.generate`` the way ``vllm_offline.py`` times vLLM.

Runs in the project venv, as a child process of ``engine_peer.py`` so that its
peak RSS and core binding are its own::

    python bench/peers/splitserve_offline.py --model DIR --workload engine.json \
        --dtype float32 --threads 2 --out result.json

Startup (``LLM(...)``), a cold batch (the first), a warm batch, then one
request alone; peak RSS of this process tree; warm output ids. The JSON has
the ``vllm_offline`` result's shape (schema ``splitserve.bench.splitserve_offline/v1``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers.vllm_offline import RssSampler  # noqa: E402  (stdlib-only helpers)

RESULT_SCHEMA = "splitserve.bench.splitserve_offline/v1"
BLOCK_SIZE = 16
# The token budget of a step, as vLLM's: its offline ``LLM`` on a CPU defaults
# to 4096 (its API server to 2048; vllm/engine/arg_utils.py), and the peer
# runs with its defaults, so ours gets the same budget here.
MAX_BATCH_TOKENS = 4096


def _time_batch(llm: Any, prompts: list[dict[str, Any]], params: Any) -> dict[str, Any]:
    start = time.monotonic()
    outputs = llm.generate(prompts, params)
    elapsed = time.monotonic() - start
    ids = [list(o.outputs[0].token_ids) for o in outputs]
    n = sum(len(t) for t in ids)
    return {"elapsed_s": elapsed, "output_tokens": n, "output_tok_s": n / elapsed, "latencies_s": None,
            "token_ids": ids}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(args.threads)))  # the cores vLLM binds: 0..threads-1
    workload = json.loads(Path(args.workload).read_text())
    with RssSampler() as rss:
        t0 = time.monotonic()
        import torch

        torch.set_num_threads(args.threads)
        from splitserve.engine import LLM, SamplingParams

        max_len = max(len(r["prompt_token_ids"]) + r["max_tokens"] for r in workload["requests"])
        llm = LLM(args.model, device="cpu", dtype=args.dtype, block_size=BLOCK_SIZE,
                  max_model_len=max_len + BLOCK_SIZE, max_num_batched_tokens=MAX_BATCH_TOKENS)
        startup_s = time.monotonic() - t0
        prompts = [{"prompt_token_ids": list(r["prompt_token_ids"])} for r in workload["requests"]]
        params = SamplingParams(temperature=0.0, max_tokens=workload["requests"][0]["max_tokens"],
                                ignore_eos=bool(workload["ignore_eos"]))
        cold = _time_batch(llm, prompts, params)
        warm = _time_batch(llm, prompts, params)
        single = _time_batch(llm, prompts[:1], params)
    cold.pop("token_ids")
    single.pop("token_ids")
    warm_ids = warm.pop("token_ids")
    return {
        "schema": RESULT_SCHEMA, "model": str(args.model), "dtype": args.dtype, "threads": args.threads,
        "workload": workload["name"], "num_requests": len(prompts),
        "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts),
        "startup_s": startup_s, "cold": cold, "warm": warm,
        "single_request_latency_s": single["elapsed_s"], "peak_rss_bytes": rss.peak_bytes,
        "output_token_ids": warm_ids,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="splitserve offline timing (peer-bench child).")
    parser.add_argument("--model", required=True)
    parser.add_argument("--workload", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    Path(args.out).write_text(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
