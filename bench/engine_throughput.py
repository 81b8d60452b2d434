"""Offline engine throughput: splitserve vs transformers, same model, same requests.

Workload (``bench/workload.py``): 64 requests, prompt lengths uniform in
[32, 512] from a fixed seed, 128 output tokens each, greedy, ``ignore_eos``
(``--quick``: 16 requests, [32, 256], 64 tokens). Model: the ~56M-parameter
random Llama of ``bench/bench_models.py`` (hidden 512, 8 layers, 8 heads,
4 KV heads, intermediate 1408, vocab 32000).

Systems, run one after the other in this process:

* ``splitserve``: ``LLM`` -- its engine core stepped to completion, recording
  when each request finishes (what ``LLM.generate`` does, plus timestamps);
* ``hf_cb``: transformers ``generate_batch`` (continuous batching, paged
  cache) with an explicit ``ContinuousBatchingConfig``;
* ``hf_generate``: transformers ``generate`` on the whole batch, left-padded.

Reported: output tokens/s over the run's wall time, request latency
(submission of the batch to the request's last token), and how many requests'
tokens equal splitserve's (greedy fp32 should agree). Prints a table;
``--json PATH`` writes the numbers with the hardware and workload.

``--constraint json`` measures what structured outputs cost instead: the
same batch through splitserve with no constraint and with the deployment
guide's JSON schema (``{"entities": [{"name", "type"}]}``, vLLM's default
options) on every request, alternating ``--rounds`` times (default 2: none,
json, json, none) in one process. Both use a byte-level BPE tokenizer of the model's 32,000 tokens
(``bench/bpe_tokenizer.py``; llguidance cannot use the word-level one); the
random weights never close a string, so constrained requests run to
``max_tokens`` too. Reported: output tok/s of each run and the slowdown
(target <= 10%).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_models import BENCH_MODELS, LLAMA_56M, ensure_bench_model  # noqa: E402
from bench.workload import EngineWorkload, engine_workload  # noqa: E402

SYSTEMS = ("splitserve", "hf_cb", "hf_generate")
GUIDE_SCHEMA = {"type": "object", "properties": {"entities": {"type": "array", "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "type": {"type": "string"}},
    "required": ["name", "type"]}}}, "required": ["entities"]}
BLOCK_SIZE = 16
MAX_BATCH_TOKENS = 2048


@dataclass
class SystemResult:
    system: str
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    latency_p50_s: float
    latency_p90_s: float
    latency_max_s: float
    errors: int = 0
    agree_with_splitserve: str = ""
    cpu_s: float = 0.0  # this process's CPU time over the run (splitserve only)
    token_ids: list[list[int]] = field(default_factory=list, repr=False)


def _result(system: str, wall: float, latencies: list[float], tokens: list[list[int]],
            errors: int = 0) -> SystemResult:
    ordered = sorted(latencies)
    n = sum(len(t) for t in tokens)
    return SystemResult(system, wall, n, n / wall if wall else 0.0, statistics.median(ordered),
                        ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], ordered[-1], errors,
                        token_ids=tokens)


def run_splitserve(model: Path, workload: EngineWorkload, device: str, dtype: str,
                   constraint: object = None, tokenizer: object = None, name: str = "splitserve") -> SystemResult:
    """``constraint`` (a ``structured.Constraint``) goes on every request,
    masks built from ``tokenizer`` (compiled in the warm-up, not timed)."""
    from splitserve.engine import LLM, SamplingParams

    llm = LLM(str(model), device=device, dtype=dtype, block_size=BLOCK_SIZE,
              max_model_len=workload.max_seq_len + BLOCK_SIZE, max_num_batched_tokens=MAX_BATCH_TOKENS)
    core = llm.engine_core
    if tokenizer is not None:
        core.structured.offer_tokenizer(tokenizer)
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, constraint=constraint)
    llm.generate([{"prompt_token_ids": list(r.prompt_token_ids[:64])} for r in workload.requests[:4]], warm)
    start, cpu_start = time.perf_counter(), time.process_time()
    for r in workload.requests:
        core.add_request(r.request_id, r.prompt_token_ids,
                         SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True,
                                        constraint=constraint))
    tokens: dict[str, list[int]] = {r.request_id: [] for r in workload.requests}
    finished: dict[str, float] = {}
    while core.has_unfinished_requests():
        for out in core.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = time.perf_counter() - start
    wall = time.perf_counter() - start
    core.check_no_leaks()
    cpu = time.process_time() - cpu_start
    ids = [r.request_id for r in workload.requests]
    result = _result(name, wall, [finished[i] for i in ids], [tokens[i] for i in ids])
    result.cpu_s = cpu
    return result


def run_constraint_cost(model: Path, workload: EngineWorkload, device: str, dtype: str,
                        rounds: int) -> tuple[list[SystemResult], dict[str, object]]:
    """No constraint, then the guide's schema on every request, ``rounds``
    times; returns the runs and a summary (median tok/s of each, slowdown)."""
    from bench.bpe_tokenizer import byte_level_tokenizer
    from splitserve.engine.structured import Constraint

    tokenizer = byte_level_tokenizer(LLAMA_56M.vocab_size)
    constraint = Constraint.json_schema(GUIDE_SCHEMA)
    results: list[SystemResult] = []
    runs = (("none", None), ("json", constraint))
    for round_ in range(rounds):
        # none, json, json, none, ...: neither side always runs first (the first
        # LLM of a process pays one-time costs).
        for label, c in runs if round_ % 2 == 0 else runs[::-1]:
            print(f"round {round_ + 1}: splitserve, constraint {label} ...", flush=True)
            results.append(run_splitserve(model, workload, device, dtype, c, tokenizer, f"splitserve/{label}"))
    if any(len(t) < r.max_tokens for res in results if res.system.endswith("json")
           for t, r in zip(res.token_ids, workload.requests)):
        print("note: some constrained requests completed their JSON before max_tokens", flush=True)
    def median(label: str, per_cpu: bool = False) -> float:
        return statistics.median(r.output_tokens / (r.cpu_s if per_cpu else r.wall_s)
                                 for r in results if r.system.endswith(label))

    none, json_ = median("none"), median("json")
    none_cpu, json_cpu = median("none", True), median("json", True)
    summary = {"schema": GUIDE_SCHEMA, "rounds": rounds, "median_tok_s_none": none, "median_tok_s_json": json_,
               "slowdown": 1 - json_ / none, "median_tok_per_cpu_s_none": none_cpu,
               "median_tok_per_cpu_s_json": json_cpu, "slowdown_cpu": 1 - json_cpu / none_cpu,
               "target_slowdown": 0.10}
    # CPU time is the steadier figure on a shared machine: another process's
    # load stretches wall time far more than the work done.
    print(f"JSON schema on every request (median of {rounds}): {json_:.1f} vs {none:.1f} out tok/s "
          f"({100 * (1 - json_ / none):+.1f}%), {json_cpu:.1f} vs {none_cpu:.1f} out tok per CPU-s "
          f"({100 * (1 - json_cpu / none_cpu):+.1f}%) unconstrained; target <= 10% slower")
    return results, summary


def _hf_model(model: Path, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model), dtype=getattr(torch, dtype)).to(device).eval()


def run_hf_cb(model: Path, workload: EngineWorkload, device: str, dtype: str) -> SystemResult:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    hf = _hf_model(model, device, dtype)
    tokens_needed = sum(len(r.prompt_token_ids) + r.max_tokens for r in workload.requests)
    cb = ContinuousBatchingConfig(page_size=BLOCK_SIZE, num_blocks=tokens_needed // BLOCK_SIZE + 2 * len(workload.requests),
                                  max_batch_tokens=MAX_BATCH_TOKENS)
    gen = GenerationConfig(max_new_tokens=workload.max_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    inputs = [list(r.prompt_token_ids) for r in workload.requests]
    hf.generate_batch(inputs[:4], generation_config=GenerationConfig(max_new_tokens=4, do_sample=False,
                      eos_token_id=None, pad_token_id=0), continuous_batching_config=cb)
    start = time.perf_counter()
    results = hf.generate_batch(inputs, generation_config=gen, continuous_batching_config=cb,
                                record_timestamps=True)
    wall = time.perf_counter() - start
    by_prompt: dict[tuple[int, ...], object] = {tuple(o.prompt_ids): o for o in results.values()}
    tokens, latencies, errors = [], [], 0
    for prompt in inputs:
        out = by_prompt.get(tuple(prompt))
        if out is None or out.error:
            errors += 1
            tokens.append([])
            latencies.append(wall)
            continue
        tokens.append(list(out.generated_tokens))
        stamps = out.timestamps or []
        # Timestamps are perf_counter-style clocks of the same process when recorded.
        latencies.append(max(stamps) - start if stamps and max(stamps) > start else wall)
    return _result("hf_cb", wall, latencies, tokens, errors)


def run_hf_generate(model: Path, workload: EngineWorkload, device: str, dtype: str) -> SystemResult:
    import torch

    hf = _hf_model(model, device, dtype)
    prompts = [list(r.prompt_token_ids) for r in workload.requests]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        hf.generate(ids[:2, -32:], attention_mask=mask[:2, -32:], max_new_tokens=4, do_sample=False,
                    eos_token_id=None, pad_token_id=0)
        start = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=workload.max_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        wall = time.perf_counter() - start
    tokens = out[:, width:].tolist()
    return _result("hf_generate", wall, [wall] * len(prompts), tokens)


RUNNERS = {"splitserve": run_splitserve, "hf_cb": run_hf_cb, "hf_generate": run_hf_generate}


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(ours, theirs))
    return f"{same}/{len(ours)}"


def _hardware(device: str) -> dict[str, object]:
    import torch

    info: dict[str, object] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                               "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                               "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 requests, prompts 32-256, 64 tokens")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--model", default=LLAMA_56M.name, choices=sorted(BENCH_MODELS),
                        help="random checkpoint shape (bench/bench_models.py)")
    parser.add_argument("--peer", choices=("vllm",), default=None,
                        help="also run vLLM's CPU build on the same workload (bench/peers/engine_peer.py); "
                             "--dtype float32|bfloat16|both, --threads 1|2")
    parser.add_argument("--threads", type=int, choices=(1, 2), default=2, help="cores for --peer runs")
    parser.add_argument("--constraint", choices=("none", "json"), default="none",
                        help="json: splitserve with and without a JSON schema on every request, in one run")
    parser.add_argument("--rounds", type=int, default=2, help="--constraint json: rounds of both (default 2)")
    args = parser.parse_args(argv)
    if args.peer:
        from bench.peers.engine_peer import main_peer

        return main_peer(args)

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown system(s) {unknown}; choose from {SYSTEMS}")
    spec = BENCH_MODELS[args.model]
    workload = engine_workload(spec.vocab_size, quick=args.quick, num_requests=args.num_requests,
                               max_tokens=args.max_tokens)
    model = ensure_bench_model(dtype, spec)
    print(f"model {spec.name} ({spec.num_parameters / 1e6:.0f}M params, {dtype}) on {device}; "
          f"workload {workload.name}: {len(workload.requests)} requests, {workload.num_prompt_tokens} prompt "
          f"tokens, {workload.max_tokens} output tokens each", flush=True)

    results: list[SystemResult] = []
    constraint_summary: dict[str, object] | None = None
    if args.constraint == "json":
        results, constraint_summary = run_constraint_cost(model, workload, device, dtype, max(1, args.rounds))
    for system in systems if constraint_summary is None else ():
        print(f"running {system} ...", flush=True)
        results.append(RUNNERS[system](model, workload, device, dtype))
    reference = next((r for r in results if r.system == "splitserve"), None)
    for r in results:
        if reference is not None and r is not reference:
            r.agree_with_splitserve = _agreement(reference.token_ids, r.token_ids)

    header = f"{'system':<16} {'wall s':>8} {'out tok/s':>10} {'p50 lat s':>10} {'p90 lat s':>10} " \
             f"{'max lat s':>10} {'errors':>6} {'= ours':>7} {'cpu s':>7}"
    print(header)
    for r in results:
        print(f"{r.system:<16} {r.wall_s:>8.2f} {r.output_tokens_per_s:>10.1f} {r.latency_p50_s:>10.2f} "
              f"{r.latency_p90_s:>10.2f} {r.latency_max_s:>10.2f} {r.errors:>6} {r.agree_with_splitserve:>7} "
              f"{r.cpu_s:>7.1f}")
    if args.json:
        data = {
            "benchmark": "engine_throughput",
            "hardware": _hardware(device),
            "model": {**asdict(spec), "dtype": dtype, "num_parameters": spec.num_parameters},
            "workload": {"name": workload.name, "seed": workload.seed, "num_requests": len(workload.requests),
                         "prompt_tokens": workload.num_prompt_tokens, "max_tokens": workload.max_tokens,
                         "greedy": True, "ignore_eos": True},
            "baselines": "transformers generate_batch (continuous batching) and batched generate",
            "results": [{k: v for k, v in asdict(r).items() if k != "token_ids"} for r in results],
        }
        if constraint_summary is not None:
            data["baselines"] = "splitserve without a constraint, same process, alternating"
            data["constraint"] = constraint_summary
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
