"""Injected KV transfer failures through `splitserve up` (1 prefill + 1 decode):
the test-only transport hook (``SPLITSERVE_KV_FAULTS="fail=0.5"``, read by
each pod at start) fails half the READs at random (seeded). Every failed
READ falls back to recomputing the prompt on the decode pod, every stream is
token-identical to the no-fault run, and each fault is counted the same on
the pod (injected, transfer failures) and in the router (recomputed).

The no-fault run comes first, with the prefill pool at 0: the decode pod
computes each prompt itself, no READ happens, so no fault can.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos_support import (
    SPECS, Streams, assert_identical, assert_pods_clean, pods_counter, pods_of, reference_outcomes, router_counter,
    up_cluster, wait_router_ready,
)
from e2e_support import KV_CACHE_ARGS, UpProcess

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

POD_ARGS = [*KV_CACHE_ARGS, "--max-model-len", "512", "--kv-lease-seconds", "4"]


@pytest.fixture(scope="module")
def up(llama_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    with up_cluster(llama_model, tmp_path_factory.mktemp("kv-faults"), prefill=0, decode=1, pod_args=POD_ARGS,
                    router_args=["--pd-threshold-tokens=0"],
                    env={"SPLITSERVE_KV_FAULTS": "fail=0.5,seed=16"}) as process:
        yield process


def test_injected_read_failures_recompute_exactly_and_are_counted(up: UpProcess) -> None:
    reference = reference_outcomes(up)  # decode_only: no READ
    assert router_counter(up.port, "splitserve:pd_decisions_total", path="disaggregated") == 0
    up.control().scale({"prefill": 1})
    wait_router_ready(up)
    decode = pods_of(up, "decode")

    def counts() -> tuple[float, float, float, float]:
        return (pods_counter(decode, "splitserve:kv_transfer_faults_injected_total", fault="fail"),
                pods_counter(decode, "splitserve:kv_transfer_failures_total"),
                router_counter(up.port, "splitserve:router_retries_total", role="decode",
                               reason="kv_pull_recomputed"),
                router_counter(up.port, "splitserve:pd_decisions_total", path="disaggregated"))

    before = counts()
    specs = [i for i in range(len(SPECS)) for _ in range(3)]
    assert_identical(Streams(up.base_url, str(up.model), specs, "kv-faults").results(), reference)
    injected, failures, recomputed, handed_off = (a - b for a, b in zip(counts(), before))
    print(f"{len(specs)} streams, {handed_off:.0f} handed off, {injected:.0f} READs failed by the hook, "
          f"{failures:.0f} transfer failures, {recomputed:.0f} recomputed")
    assert handed_off == len(specs)
    assert injected == failures == recomputed
    assert 0 < injected < len(specs), "the hook must fail some READs and let others through"
    assert_pods_clean(up)
