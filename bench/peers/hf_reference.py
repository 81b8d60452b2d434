"""Greedy reference outputs from Hugging Face transformers (project venv).

A plain KV-cached argmax loop that never stops at EOS — the same semantics as
``ignore_eos`` greedy in vLLM and splitserve — so fp32 outputs of the systems
can be checked against it with :func:`bench.peers.agreement.token_agreement`.

CLI: ``python bench/peers/hf_reference.py --vllm-json OUT.json [--limit 8]``
compares against the token ids saved by ``vllm_runner.py --json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers.agreement import token_agreement  # noqa: E402
from bench.workload import EngineWorkload, engine_workload  # noqa: E402


def hf_greedy(model_dir: Path, workload: EngineWorkload, dtype: str = "float32",
              limit: int | None = None, threads: int | None = None) -> list[list[int]]:
    """Greedy output ids for the first ``limit`` requests (all if None), one request at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.eval()
    outputs = []
    with torch.inference_mode():
        for req in workload.requests[:limit]:
            ids = torch.tensor([req.prompt_token_ids])
            out = model(input_ids=ids, use_cache=True)
            past, generated = out.past_key_values, []
            for step in range(req.max_tokens):
                nxt = int(out.logits[0, -1].argmax())
                generated.append(nxt)
                if step + 1 == req.max_tokens:
                    break
                out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
            outputs.append(generated)
    return outputs


def main(argv: list[str] | None = None) -> int:
    from bench.bench_models import LLAMA_56M, ensure_bench_model

    parser = argparse.ArgumentParser(description="Check vLLM's greedy outputs against transformers.")
    parser.add_argument("--vllm-json", type=Path, required=True, help="written by vllm_runner.py --json")
    parser.add_argument("--limit", type=int, default=8)
    args = parser.parse_args(argv)
    for run in json.loads(args.vllm_json.read_text()):
        quick = run["workload"] == "engine-quick"
        workload = engine_workload(LLAMA_56M.vocab_size, quick=quick)
        ref = hf_greedy(ensure_bench_model(run["dtype"]), workload, run["dtype"], args.limit)
        agree = token_agreement(ref, run["output_token_ids"][: args.limit])
        print(f"{run['workload']} {run['dtype']}: {agree}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
