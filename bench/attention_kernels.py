"""GPU speed of the Triton paged-attention kernels.

For decode (batch x context) and prefill (tokens, with and without a cached
prefix) it reports time, achieved bytes/s and FLOP/s of ``paged_attention``
against torch ``scaled_dot_product_attention`` on the same data laid out
contiguously, and against the device's copy bandwidth (a large device-to-device
copy, read + write bytes), all in one run. Targets (reported, never asserted):
decode >= 70% of copy bandwidth at batch 64 x 4k context; prefill within 1.3x
of SDPA time.

Model shape: Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128),
bf16, block size 16, a two-layer block-major cache read at layer 1 (strides as
in the engine). ``paged_attention`` is timed with ``validate=False`` and the
host-known maxima (as the engine calls it); ``checked_ms`` is the default
call including its one host sync.

CLI: ``python bench/attention_kernels.py [--quick] [--json PATH]``. Without CUDA it says
so and exits 0; with ``--quick`` it first runs a tiny interpreter smoke test
(correctness only, no timings).

``--cpu`` times the C kernels of the CPU backend instead, per build level
(``bench/cpu_kernels.py``): ``--level NAME`` (repeatable: native, x86-64-v4,
x86-64-v3, x86-64-v2; default every one this CPU runs) or ``--library FILE``
(any built library, e.g. an older one to compare), ``--threads N``,
``--rounds N``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_LAYERS = 32, 8, 128, 16, 2
DTYPE = torch.bfloat16
# Skip shapes whose paged cache plus its contiguous copy would crowd an 80 GB card.
MAX_KV_BYTES = 16 << 30
DECODE_TARGET_BW_FRACTION = 0.70
PREFILL_TARGET_SDPA_RATIO = 1.3

DECODE_FULL = [(b, c) for b in (1, 8, 64, 256) for c in (512, 4096, 32768)]
DECODE_QUICK = [(1, 4096), (64, 4096), (8, 32768)]
# (num_seqs, query tokens per sequence, cached prefix tokens per sequence)
PREFILL_FULL = [
    (1, 1024, 0), (1, 4096, 0), (1, 16384, 0), (4, 2048, 0),
    (1, 1024, 3072), (1, 4096, 4096), (1, 2048, 14336), (4, 512, 1536),
]
PREFILL_QUICK = [(1, 4096, 0), (1, 2048, 2048)]


@dataclass
class Row:
    kind: str  # "decode" | "prefill"
    num_seqs: int
    q_len: int  # query tokens per sequence
    context: int  # total tokens per sequence (prefix + query)
    ms: float
    checked_ms: float
    sdpa_ms: float | None
    gbytes_per_s: float
    tflops: float
    bw_fraction: float  # achieved bytes/s over measured copy bandwidth
    vs_sdpa: float | None  # our time / SDPA time


def _bench(fn: Callable[[], object]) -> float:
    """Median milliseconds (Triton's do_bench: warm-up, L2 flush between runs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting read and write."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def _paged_batch(num_seqs: int, q_len: int, context: int, device: torch.device):
    """Random paged batch on shuffled blocks, and the same K/V laid out contiguously."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq
    cache = torch.empty(num_blocks, NUM_LAYERS, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    cache.normal_()
    block_tables = torch.randperm(num_blocks, device=device).view(num_seqs, blocks_per_seq).to(torch.int32)
    query = torch.randn(num_seqs * q_len, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    seq_lens = torch.full((num_seqs,), context, dtype=torch.int32, device=device)
    query_start_loc = torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * q_len
    layer = 1
    kv = cache[block_tables.long(), layer]  # [seqs, blocks, 2, block_size, kv_heads, dim]
    kv = kv.permute(2, 0, 4, 1, 3, 5).reshape(2, num_seqs, NUM_KV_HEADS, -1, HEAD_DIM)[:, :, :, :context]
    k, v = kv[0].contiguous(), kv[1].contiguous()  # [seqs, kv_heads, context, dim]
    q = query.view(num_seqs, q_len, NUM_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    args = (query, cache, layer, block_tables, seq_lens, query_start_loc, HEAD_DIM**-0.5)
    return args, q, k, v


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> Callable[[], object] | None:
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q_len, context = q.shape[2], k.shape[2]
    if q_len == 1:
        return lambda: sdpa(q, k, v, enable_gqa=True)
    if prefix == 0:
        return lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True)
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(q_len, context)
    # The bias object takes no enable_gqa; give it K/V repeated per query head (outside the timing).
    group = NUM_HEADS // NUM_KV_HEADS
    k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return lambda: sdpa(q, k_rep, v_rep, attn_mask=mask)


def run_shape(kind: str, num_seqs: int, q_len: int, prefix: int, copy_bw: float, device: torch.device) -> Row | None:
    from splitserve.kernels.paged_attention import paged_attention

    context = prefix + q_len
    elem = torch.finfo(DTYPE).bits // 8
    kv_bytes = 2 * num_seqs * context * NUM_KV_HEADS * HEAD_DIM * elem
    if kv_bytes > MAX_KV_BYTES:
        return None
    args, q, k, v = _paged_batch(num_seqs, q_len, context, device)
    fast = lambda: paged_attention(*args, validate=False, max_query_len=q_len, max_seq_len=context)  # noqa: E731
    ms = _bench(fast)
    checked_ms = _bench(lambda: paged_attention(*args))
    sdpa_fn = _sdpa(q, k, v, prefix)
    sdpa_ms: float | None = None
    if sdpa_fn is not None:
        try:
            sdpa_ms = _bench(sdpa_fn)
        except RuntimeError as exc:  # an SDPA backend refusing the shape
            print(f"  sdpa failed for {kind} {num_seqs}x{q_len}+{prefix}: {exc}", file=sys.stderr)
    q_bytes = 2 * num_seqs * q_len * NUM_HEADS * HEAD_DIM * elem  # query read + output written
    moved = kv_bytes + q_bytes
    # Visible (query, key) pairs under the causal mask with a cached prefix.
    pairs = num_seqs * (q_len * prefix + q_len * (q_len + 1) // 2)
    flops = 4 * pairs * NUM_HEADS * HEAD_DIM
    del args, q, k, v
    torch.cuda.empty_cache()
    return Row(
        kind=kind, num_seqs=num_seqs, q_len=q_len, context=context, ms=ms, checked_ms=checked_ms,
        sdpa_ms=sdpa_ms, gbytes_per_s=moved / (ms * 1e-3) / 1e9, tflops=flops / (ms * 1e-3) / 1e12,
        bw_fraction=moved / (ms * 1e-3) / copy_bw, vs_sdpa=None if sdpa_ms is None else ms / sdpa_ms,
    )


def targets(rows: list[Row]) -> dict[str, object]:
    decode = [r for r in rows if r.kind == "decode" and r.num_seqs == 64 and r.context == 4096]
    prefill = [r for r in rows if r.kind == "prefill" and r.vs_sdpa is not None]
    worst = max((r.vs_sdpa for r in prefill), default=None)  # type: ignore[type-var]
    return {
        "decode_b64_ctx4k_bw_fraction": decode[0].bw_fraction if decode else None,
        "decode_target": DECODE_TARGET_BW_FRACTION,
        "decode_met": bool(decode) and decode[0].bw_fraction >= DECODE_TARGET_BW_FRACTION,
        "prefill_worst_vs_sdpa": worst,
        "prefill_target": PREFILL_TARGET_SDPA_RATIO,
        "prefill_met": worst is not None and worst <= PREFILL_TARGET_SDPA_RATIO,
    }


def print_table(rows: list[Row], copy_bw: float) -> None:
    print(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (1 GiB device-to-device, read + write)")
    header = f"{'kind':8} {'seqs':>5} {'q_len':>6} {'ctx':>6} {'ms':>8} {'chk_ms':>8} {'sdpa_ms':>8} {'GB/s':>7} {'TFLOP/s':>8} {'%copy':>6} {'/sdpa':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        sdpa = "-" if r.sdpa_ms is None else f"{r.sdpa_ms:.3f}"
        ratio = "-" if r.vs_sdpa is None else f"{r.vs_sdpa:.2f}"
        print(
            f"{r.kind:8} {r.num_seqs:>5} {r.q_len:>6} {r.context:>6} {r.ms:>8.3f} {r.checked_ms:>8.3f} {sdpa:>8} "
            f"{r.gbytes_per_s:>7.0f} {r.tflops:>8.1f} {100 * r.bw_fraction:>5.0f}% {ratio:>6}"
        )


def interpreter_smoke() -> None:
    """Tiny decode and prefill through the Triton interpreter against the references."""
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    from splitserve.kernels.paged_attention import paged_attention, paged_attention_reference

    torch.manual_seed(0)
    for q_len, context in ((1, 100), (24, 40)):
        cache = torch.randn(2 * -(-context // BLOCK_SIZE), 1, 2, BLOCK_SIZE, 2, 64)
        tables = torch.randperm(cache.shape[0])[: -(-context // BLOCK_SIZE)].view(1, -1).to(torch.int32)
        args = (
            torch.randn(q_len, 4, 64), cache, 0, tables, torch.tensor([context], dtype=torch.int32),
            torch.tensor([0, q_len], dtype=torch.int32), 0.125,
        )
        err = (paged_attention(*args, num_splits=2) - paged_attention_reference(*args)).abs().max().item()
        print(f"interpreter smoke q_len={q_len} context={context}: max abs error {err:.2e}")
        if err > 1e-4:
            raise SystemExit("interpreter smoke failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes (< 1 minute)")
    parser.add_argument("--json", metavar="PATH", help="write the rows, copy bandwidth and targets as JSON")
    parser.add_argument("--cpu", action="store_true", help="time the C kernels of the CPU backend per build level")
    parser.add_argument("--level", action="append", help="with --cpu: a build level to time (repeatable)")
    parser.add_argument("--library", action="append", help="with --cpu: a built library file to time (repeatable)")
    parser.add_argument("--threads", type=int, default=2, help="with --cpu: torch threads (default 2)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="with --cpu: the kernels' cache dir")
    parser.add_argument("--rounds", type=int, default=3, help="with --cpu: turns each build takes per shape")
    ns = parser.parse_args(argv)
    if ns.cpu:
        from bench.cpu_kernels import cpu_main

        return cpu_main(ns)
    if not torch.cuda.is_available():
        print("no CUDA device: GPU timings need a GPU (bench/attention_kernels.py on one produces the figures)")
        if ns.quick:
            interpreter_smoke()
        return 0
    device = torch.device("cuda")
    copy_bw = copy_bandwidth(device)
    rows: list[Row] = []
    decode = DECODE_QUICK if ns.quick else DECODE_FULL
    prefill = PREFILL_QUICK if ns.quick else PREFILL_FULL
    print(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s", flush=True)
    shapes = [("decode", b, 1, c - 1) for b, c in decode] + [("prefill", *shape) for shape in prefill]
    for kind, num_seqs, q_len, prefix in shapes:
        row = run_shape(kind, num_seqs, q_len, prefix, copy_bw, device)
        if row is not None:
            rows.append(row)
            print(json.dumps(asdict(row)), flush=True)  # a run cut short keeps the rows measured so far
    print(f"device: {torch.cuda.get_device_name(device)}, {DTYPE}, heads {NUM_HEADS}/{NUM_KV_HEADS}, head_dim {HEAD_DIM}")
    print_table(rows, copy_bw)
    result = targets(rows)
    print(json.dumps(result))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(device),
                    "dtype": str(DTYPE),
                    "copy_bandwidth_bytes_per_s": copy_bw,
                    "rows": [asdict(r) for r in rows],
                    "targets": result,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
