"""Per-request KV handoff through splitserve's real pods, measured like vLLM's.

``kv_transfer.py --peer vllm`` times vLLM's handoff on its decode server: the
decode request's wall time (``max_tokens=1``, with the prefill server's
``kv_transfer_params``) and its own NIXL READ histogram. This module does the
same for a ``splitserve up`` pair (1 prefill + 1 decode pod, UCX defaults):
Prefill over gRPC, then the decode pod's Decode stream (with the prefill's KV
handle) until it finishes after one token, timed from the call; and the delta
of the decode pod's ``splitserve:kv_transfer_seconds`` histogram (claim done to
READ done) and the bytes its ``Finished`` event reports pulled.
"""
from __future__ import annotations

import asyncio
import random
import statistics
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.peers.kv_peer import parse_metric_sums

KV_SECONDS = "splitserve:kv_transfer_seconds"


@dataclass(frozen=True)
class PodHandoff:
    """One prefill -> decode handoff of a ``prompt_tokens``-token prompt through the pods."""

    prompt_tokens: int
    kv_source: str | None
    pulled_bytes: int
    read_s: float | None  # delta of the decode pod's kv_transfer_seconds_sum
    decode_wall_s: float  # Decode RPC call to its Finished event (one token)
    prefill_wall_s: float

    @property
    def mb_per_s(self) -> float | None:
        if not self.pulled_bytes or not self.read_s:
            return None
        return self.pulled_bytes / self.read_s / 1e6


def _scrape(http_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as resp:
        return parse_metric_sums(resp.read().decode(), (KV_SECONDS,))


async def _handoff(prefill, decode, decode_http_port: int, request_id: str, prompt: list[int]) -> PodHandoff:
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.router.pd_client import DecodeFinished

    sampling = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    t0 = time.monotonic()
    first = await prefill.prefill(request_id, tuple(prompt), sampling)
    t1 = time.monotonic()
    before = await asyncio.to_thread(_scrape, decode_http_port)
    finished = None
    t2 = time.monotonic()
    async for event in decode.decode(request_id, tuple(prompt) + (first.first_token_id,), len(prompt), sampling,
                                     first.kv_handle):
        if isinstance(event, DecodeFinished):
            finished = event
    t3 = time.monotonic()
    after = await asyncio.to_thread(_scrape, decode_http_port)
    read_s = None
    if KV_SECONDS + "_sum" in after:
        read_s = after[KV_SECONDS + "_sum"] - before.get(KV_SECONDS + "_sum", 0.0)
    return PodHandoff(prompt_tokens=len(prompt), kv_source=finished.kv_source if finished else None,
                      pulled_bytes=finished.num_pulled_bytes if finished else 0, read_s=read_s,
                      decode_wall_s=t3 - t2, prefill_wall_s=t1 - t0)


def measure_pod_handoffs(model_dir: Path, lengths: tuple[int, ...], vocab_size: int, repeats: int = 1,
                         log_dir: Path | None = None) -> tuple[list[PodHandoff], float]:
    """Start 1 prefill + 1 decode pod (and the router, unused here), one
    warm-up handoff (the peer handshake), then ``repeats`` per length; returns
    rows and startup seconds. Every process is stopped on the way out."""
    from splitserve.local.launcher import LocalCluster, LocalClusterConfig, free_port
    from splitserve.router.pd_client import PodClient

    max_len = max(lengths) + 16
    config = LocalClusterConfig(model=str(model_dir), port=free_port(), log_dir=log_dir,
                                engine_args=["--kv-cache-memory", str(1 << 30), "--max-model-len", str(max_len)])
    cluster = LocalCluster(config)
    t0 = time.monotonic()
    cluster.start()
    startup = time.monotonic() - t0
    rng = random.Random(0)

    async def run() -> list[PodHandoff]:
        prefill_pod = next(p for p in cluster.pods if p.role == "prefill")
        decode_pod = next(p for p in cluster.pods if p.role == "decode")
        prefill = PodClient(f"127.0.0.1:{prefill_pod.grpc_port}")
        decode = PodClient(f"127.0.0.1:{decode_pod.grpc_port}")
        try:
            await _handoff(prefill, decode, decode_pod.http_port, "warm",
                           [rng.randrange(100, vocab_size) for _ in range(32)])
            rows = []
            for i, length in enumerate(n for n in lengths for _ in range(repeats)):
                prompt = [rng.randrange(100, vocab_size) for _ in range(length)]
                rows.append(await _handoff(prefill, decode, decode_pod.http_port, f"handoff-{i}", prompt))
            return rows
        finally:
            await prefill.close()
            await decode.close()

    try:
        return asyncio.run(run()), startup
    finally:
        cluster.stop()


def format_per_request(vllm_rows: list, pod_rows: list[PodHandoff]) -> str:
    """Per prompt length, medians over repeats: the decode side's request time
    with a remote KV pull, and the READ alone, vLLM beside splitserve's pods."""
    header = (f"{'tokens':>6} | {'vLLM dec':>9} {'ours dec':>9} {'ratio':>6} | {'vLLM READ':>9} "
              f"{'ours READ':>9} {'vLLM MB/s':>9} {'ours MB/s':>9}")
    lines = [header, "-" * len(header)]
    for length in sorted({r.prompt_tokens for r in pod_rows}):
        v = [r for r in vllm_rows if r.prompt_tokens == length]
        o = [r for r in pod_rows if r.prompt_tokens == length]
        v_dec, o_dec = _median([r.decode_wall_s for r in v]), _median([r.decode_wall_s for r in o])
        ratio = o_dec / v_dec if v_dec and o_dec else None
        lines.append(
            f"{length:>6} | {_cell(v_dec, 1e3)} {_cell(o_dec, 1e3)} {_cell(ratio, 1, width=6, digits=2)} | "
            f"{_cell(_median([r.nixl_xfer_s for r in v]), 1e3)} {_cell(_median([r.read_s for r in o]), 1e3)} "
            f"{_cell(_median([r.mb_per_s for r in v]), 1, digits=0)} "
            f"{_cell(_median([r.mb_per_s for r in o]), 1, digits=0)}")
    return "\n".join(lines)


def _median(values: list[float | None]) -> float | None:
    present = sorted(v for v in values if v is not None)
    return statistics.median(present) if present else None


def _cell(value: float | None, scale: float, width: int = 9, digits: int = 1) -> str:
    return f"{value * scale:{width}.{digits}f}" if value is not None else "-".rjust(width)
