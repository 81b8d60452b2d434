"""``kv_transfer.py --peer vllm``: vLLM NixlConnector 1P1D handoff beside ours, same model and lengths.

vLLM: a prefill (core 0) + decode (core 1) pair on the 56M bench model
(fp32). Per prompt length, a fresh random prompt (no prefix hits) goes to the
prefill server (``max_tokens=1``, ``do_remote_decode``), then to the decode
server with the returned ``kv_transfer_params`` and ``max_tokens=1``. The
decode server's ``/metrics`` is scraped before and after: the deltas of
``vllm:nixl_xfer_time_seconds`` (sum/count) and ``vllm:nixl_bytes_transferred``
(sum) are that request's NIXL READ time and bytes, as vLLM itself measures
them (vLLM moves whole 128-token CPU blocks, so 64 tokens move 2 MiB). Also
recorded: the decode request's wall time and ``local`` -- the same prompt sent
again to the decode server without kv params (``max_tokens=1``); it reuses
only what the decode server's prefix cache holds (full blocks), so it is
mostly a local recompute, and ``decode_wall - local`` (negative = the pull
beat recomputing) is *not* a pure transfer overhead.

splitserve: ``bench_nixl`` of ``kv_transfer.py`` (NixlTransport, two OS
processes, UCX shared memory) with the ``llama-56m-fp32`` layout and
``ceil(length / 16)`` blocks -- the same bytes (16 KiB per token) -- not
through the pods.
"""
from __future__ import annotations

import random
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.peers.vllm_server import VllmServer, VllmServers, completion

PROMPT_LENGTHS = (64, 256, 1024, 4080)  # the bench model's max_position_embeddings is 4096
NIXL_XFER = "vllm:nixl_xfer_time_seconds"
NIXL_BYTES = "vllm:nixl_bytes_transferred"


@dataclass(frozen=True)
class VllmHandoff:
    """One vLLM 1P1D handoff of a ``prompt_tokens``-token prompt."""

    prompt_tokens: int
    nixl_xfer_s: float | None  # vLLM's own histogram delta (sum); None if not exposed
    nixl_transfers: int  # histogram count delta
    nixl_bytes: float | None
    prefill_wall_s: float
    decode_wall_s: float
    baseline_wall_s: float  # decode server, same prompt again, no kv params (prefix cache or recompute)

    @property
    def mb_per_s(self) -> float | None:
        if not self.nixl_bytes or not self.nixl_xfer_s:
            return None
        return self.nixl_bytes / self.nixl_xfer_s / 1e6

    @property
    def handoff_overhead_s(self) -> float:
        return self.decode_wall_s - self.baseline_wall_s


def parse_metric_sums(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of every sample of ``name_sum``/``name_count``/``name`` (any labels) in Prometheus text."""
    wanted = {f"{n}{suffix}" for n in names for suffix in ("", "_sum", "_count", "_total")}
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        metric = line.split("{", 1)[0].split(" ", 1)[0]
        if metric in wanted:
            try:
                sums[metric] = sums.get(metric, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
    return sums


def scrape(server: VllmServer) -> dict[str, float] | None:
    """The NIXL sums on ``server``'s /metrics; None when the server does not
    answer within a minute (vLLM's 1P1D pair stalls for seconds at times here),
    so that request's READ figures come out as None instead of ending the run."""
    try:
        with urllib.request.urlopen(server.base_url + "/metrics", timeout=60) as resp:
            return parse_metric_sums(resp.read().decode(), (NIXL_XFER, NIXL_BYTES))
    except OSError:  # URLError, timeouts, resets
        return None


def _scrape_after(server: VllmServer, before: dict[str, float] | None,
                  wait_s: float = 3.0) -> dict[str, float] | None:
    """Scrape until the transfer count moved (stats reach /metrics a step later), at most ``wait_s``."""
    deadline = time.monotonic() + wait_s
    after = scrape(server)
    while (before is not None and after is not None
           and after.get(NIXL_XFER + "_count", 0.0) <= before.get(NIXL_XFER + "_count", 0.0)
           and time.monotonic() < deadline):
        time.sleep(0.1)
        after = scrape(server)
    return after


def _delta(after: dict[str, float] | None, before: dict[str, float] | None, key: str) -> float | None:
    """``after - before`` of ``key``; None if either scrape failed or ``after`` lacks it."""
    if after is None or before is None or key not in after:
        return None
    return after[key] - before.get(key, 0.0)


def measure_vllm_handoffs(model_dir: Path, lengths: tuple[int, ...], vocab_size: int, repeats: int = 1,
                          log_dir: Path | None = None) -> tuple[list[VllmHandoff], float]:
    """Start the pair, one warm-up request, then ``repeats`` handoffs per length; returns rows and startup s."""
    rng = random.Random(0)
    rows: list[VllmHandoff] = []
    t0 = time.monotonic()
    with VllmServers(log_dir=log_dir) as servers:
        prefill, decode = servers.start_pd_pair(model_dir, dtype="float32", max_model_len=4096)
        startup = time.monotonic() - t0
        warm = [rng.randrange(100, vocab_size) for _ in range(32)]
        completion(decode, warm, 1, kv_transfer_params=completion(
            prefill, warm, 1, kv_transfer_params={"do_remote_decode": True})["kv_transfer_params"])
        for length in [n for n in lengths for _ in range(repeats)]:
            prompt = [rng.randrange(100, vocab_size) for _ in range(length)]
            t1 = time.monotonic()
            first = completion(prefill, prompt, 1, kv_transfer_params={"do_remote_decode": True})
            t2 = time.monotonic()
            before = scrape(decode)
            t3 = time.monotonic()
            completion(decode, prompt, 1, kv_transfer_params=first["kv_transfer_params"])
            t4 = time.monotonic()
            after = _scrape_after(decode, before)
            t5 = time.monotonic()
            completion(decode, prompt, 1)
            t6 = time.monotonic()
            rows.append(VllmHandoff(
                prompt_tokens=length, nixl_xfer_s=_delta(after, before, NIXL_XFER + "_sum"),
                nixl_transfers=int(_delta(after, before, NIXL_XFER + "_count") or 0),
                nixl_bytes=_delta(after, before, NIXL_BYTES + "_sum"),
                prefill_wall_s=t2 - t1, decode_wall_s=t4 - t3, baseline_wall_s=t6 - t5))
    return rows, startup


def format_rows(vllm_rows: list[VllmHandoff], ours: list[dict]) -> str:
    """One table: per prompt length, vLLM's NIXL pull beside splitserve's NixlTransport READ."""
    ours_by_blocks = {r["blocks"]: r for r in ours}
    header = (f"{'tokens':>6} | {'vLLM MiB':>8} {'xfer ms':>8} {'MB/s':>8} {'#xfer':>5} {'dec ms':>7} "
              f"{'local ms':>8} {'dec-loc':>7} | {'ours MiB':>8} {'p50 ms':>7} {'MB/s':>8}")
    lines = [header, "-" * len(header)]
    for v in vllm_rows:
        o = ours_by_blocks.get(-(-v.prompt_tokens // 16))
        mib = f"{v.nixl_bytes / 2**20:8.2f}" if v.nixl_bytes is not None else f"{'-':>8}"
        xfer = f"{v.nixl_xfer_s * 1e3:8.2f}" if v.nixl_xfer_s is not None else f"{'-':>8}"
        mbs = f"{v.mb_per_s:8.0f}" if v.mb_per_s is not None else f"{'-':>8}"
        ours_txt = (f"{o['bytes'] / 2**20:8.2f} {o['p50_ms']:7.2f} {o['bytes'] / (o['p50_ms'] / 1e3) / 1e6:8.0f}"
                    if o else f"{'-':>8} {'-':>7} {'-':>8}")
        lines.append(f"{v.prompt_tokens:>6} | {mib} {xfer} {mbs} {v.nixl_transfers:>5} "
                     f"{v.decode_wall_s * 1e3:7.1f} {v.baseline_wall_s * 1e3:8.1f} "
                     f"{v.handoff_overhead_s * 1e3:7.1f} | {ours_txt}")
    return "\n".join(lines)
