"""Figures of a fleet run from what the sim process recorded (oracle records,
load samples, call counts) and what the client measured.

Hit rate (tokens): over every prompt computation that answered (Prefill on
a prefill pod, or Decode without a KV handle on a decode/unified pod),

    hit_rate    = sum(hit_tokens) / sum(prompt_tokens)
    oracle_rate = sum(max(oracle_tokens, hit_tokens)) / sum(prompt_tokens)

``oracle_tokens`` is, at the moment the prompt reached its pod, the longest
cached prefix any serving pod of that role held (``prefix_oracle``); the
``max`` keeps the oracle an upper bound when the chosen pod's cache grew
between arrival and scheduling (a prefix committed by a concurrent request
of the same tenant). So ``hit_rate / oracle_rate`` is the share of the
reuse available at each decision that the policy got.

Load imbalance: for the pods of a role, max / mean of each pod's
time-averaged sequences in flight (running + waiting), over pods that
served; and max / mean of requests served per pod.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def hit_rates(records: Iterable[Mapping[str, Any]], roles: Iterable[str] = ("prefill", "unified")) -> dict[str, float]:
    wanted = set(roles)
    prompt = hit = oracle = own = 0
    n = 0
    for r in records:
        if r["role"] not in wanted or r["hit_tokens"] < 0:
            continue
        n += 1
        prompt += r["prompt_tokens"]
        hit += r["hit_tokens"]
        own += r["own_tokens"]
        oracle += max(r["oracle_tokens"], r["hit_tokens"])
    if not prompt:
        return {"computations": n, "prompt_tokens": 0, "hit_rate": float("nan"), "oracle_rate": float("nan"),
                "vs_oracle": float("nan")}
    return {"computations": n, "prompt_tokens": prompt, "hit_rate": hit / prompt, "oracle_rate": oracle / prompt,
            "arrival_rate": own / prompt, "vs_oracle": hit / oracle if oracle else float("nan")}


def imbalance(values: Iterable[float]) -> float:
    """max / mean (NaN when the mean is 0)."""
    vals = list(values)
    if not vals:
        return float("nan")
    mean = sum(vals) / len(vals)
    return max(vals) / mean if mean > 0 else float("nan")


def load_imbalance(load: Mapping[str, Mapping[str, Any]], pods: Sequence[Mapping[str, Any]],
                   role: str) -> dict[str, float]:
    """From ``/fleet/load`` and ``/pods``: imbalance of time-averaged
    in-flight sequences and of requests served, for one role."""
    names = [p["name"] for p in pods if p["role"] == role]
    in_flight = [load[n]["avg_in_flight"] for n in names if n in load and load[n]["samples"]]
    rpc = "Prefill" if role == "prefill" else "Decode"
    served = [p["calls"].get(rpc, 0) for p in pods if p["role"] == role]
    return {"in_flight_max_over_mean": imbalance(in_flight),
            "mean_in_flight": sum(in_flight) / len(in_flight) if in_flight else float("nan"),
            "requests_max_over_mean": imbalance(served)}


def latency_summary(results: Sequence[Any]) -> dict[str, float]:
    """TTFT / ITL / e2e p50 and p99 (ms) of the ok requests of a replay."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [x for r in ok for x in r.itls_s]
    e2e = [r.e2e_s for r in ok]
    ms = 1000.0
    return {"ttft_p50_ms": percentile(ttft, 50) * ms, "ttft_p99_ms": percentile(ttft, 99) * ms,
            "itl_p50_ms": percentile(itl, 50) * ms, "itl_p99_ms": percentile(itl, 99) * ms,
            "e2e_p50_ms": percentile(e2e, 50) * ms, "e2e_p99_ms": percentile(e2e, 99) * ms}
