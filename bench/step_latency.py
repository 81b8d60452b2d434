"""Where a small decode step's time goes, per batch size (issue 19, item 3).

Loads the ~56M fp32 bench model (``bench/bench_models.py``) into an
``LLM`` on the CPU, starts ``B`` requests (prompts of ``--prompt-len``
tokens, greedy, ``ignore_eos``), steps until every one is decoding, then
times ``--steps`` decode steps. Each step is split into: the scheduler's
``schedule`` and ``update``, the runner's ``prepare_inputs``, the forward
(itself split into the projections (oneDNN), the attention backend's
rope/store and attention calls, the RMSNorms, and the rest), the LM head,
the sampling metadata, the sampler, and what is left (glue). Parts are
timed with ``time.perf_counter`` wrappers, which add ~1 us per call; the
``step`` column is an unwrapped run's median step, measured first.

    .venv/bin/python bench/step_latency.py --batch 1 2 4 8 --threads 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_models import LLAMA_56M, ensure_bench_model  # noqa: E402

PARTS = ("schedule", "prepare", "proj", "attn", "rope_store", "norm", "forward_rest", "lm_head",
         "sampling_meta", "sampler", "update", "glue")


def _start(llm, batch: int, prompt_len: int, max_tokens: int) -> None:
    from splitserve.engine.sampling_params import SamplingParams

    core = llm.engine_core
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(batch):
        prompt = [(7 * i + 13 * t) % 31000 + 1 for t in range(prompt_len)]
        core.add_request(f"r{batch}-{i}-{time.monotonic_ns()}", prompt, params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.requests.values()):
        core.step()


def _finish(llm) -> None:
    core = llm.engine_core
    for request_id in list(core.scheduler.requests):
        core.abort_request(request_id)


def _plain_steps(llm, steps: int) -> list[float]:
    core = llm.engine_core
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - t0)
    return times


class _Timers:
    def __init__(self) -> None:
        self.acc: dict[str, float] = defaultdict(float)
        self.stack: list[float] = []  # time spent in nested timed parts, per open frame

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self.stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                inner = self.stack.pop()
                self.acc[name] += dt - inner  # exclusive time
                if self.stack:
                    self.stack[-1] += dt
        return timed


def _instrument(llm, timers: _Timers) -> None:
    import splitserve.engine.model_runner as mr

    core = llm.engine_core
    runner = core.runner
    sched = core.scheduler
    sched.schedule = timers.wrap("schedule", sched.schedule)
    sched.update = timers.wrap("update", sched.update)
    runner.prepare_inputs = timers.wrap("prepare", runner.prepare_inputs)
    model = runner.model
    for layer in model.model.layers:
        for obj in (layer.self_attn, layer.mlp):
            for attr in ("qkv", "out", "gate_up", "down"):
                proj = getattr(obj, attr, None)
                if proj is not None:
                    setattr(obj, attr, _Shim(timers.wrap("proj", proj.__call__)))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.forward = timers.wrap("norm", norm.forward)
    model.model.norm.forward = timers.wrap("norm", model.model.norm.forward)
    model.compute_logits = timers.wrap("lm_head", model.compute_logits)
    backend = runner.backend
    backend.forward = timers.wrap("attn", backend.forward)
    if hasattr(backend, "rope_store"):
        backend.rope_store = timers.wrap("rope_store", backend.rope_store)
    if hasattr(backend, "store_kv"):
        backend.store_kv = timers.wrap("rope_store", backend.store_kv)
    model.forward = timers.wrap("forward_rest", model.forward)
    mr.build_sampling_metadata = timers.wrap("sampling_meta", mr.build_sampling_metadata)
    runner.sampler = _Shim(timers.wrap("sampler", runner.sampler.__call__))
    core.step = timers.wrap("glue", core.step)


class _Shim:
    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3, help="plain timing rounds per batch size (median of all)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-parts", action="store_true", help="only the unwrapped step time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from splitserve.engine.llm import LLM

    model = ensure_bench_model(args.dtype, LLAMA_56M)
    llm = LLM(str(model), dtype=args.dtype, device="cpu", max_num_seqs=max(args.batch),
              max_model_len=args.prompt_len + args.steps * (args.rounds + 2) + 64)
    max_tokens = args.steps * (args.rounds + 1) + 16
    _start(llm, 1, 32, 8)  # warm up: builds, first calls
    _plain_steps(llm, 8)
    _finish(llm)
    rows = []
    for batch in args.batch:
        _start(llm, batch, args.prompt_len, max_tokens)
        _plain_steps(llm, 5)
        plain: list[float] = []
        for _ in range(args.rounds):
            plain.extend(_plain_steps(llm, args.steps))
        _finish(llm)
        rows.append({"batch": batch, "step_ms": 1e3 * statistics.median(plain),
                     "step_min_ms": 1e3 * min(plain)})
    if not args.no_parts:
        timers = _Timers()
        _instrument(llm, timers)
        for row in rows:
            batch = row["batch"]
            _start(llm, batch, args.prompt_len, max_tokens)
            _plain_steps(llm, 3)
            timers.acc.clear()
            t0 = time.perf_counter()
            _plain_steps(llm, args.steps)
            wall = time.perf_counter() - t0
            _finish(llm)
            row["wrapped_step_ms"] = 1e3 * wall / args.steps
            row["parts_ms"] = {p: 1e3 * timers.acc[p] / args.steps for p in PARTS}
    head = f"{'batch':>5} {'step ms':>8} {'min':>7}"
    if not args.no_parts:
        head += f" {'wrapped':>8} " + " ".join(f"{p:>13}" for p in PARTS)
    print(head)
    for row in rows:
        line = f"{row['batch']:>5} {row['step_ms']:8.3f} {row['step_min_ms']:7.3f}"
        if "parts_ms" in row:
            line += f" {row['wrapped_step_ms']:8.3f} " + " ".join(f"{row['parts_ms'][p]:13.3f}" for p in PARTS)
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "dtype": args.dtype,
                                         "prompt_len": args.prompt_len, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
