"""Chaos through `splitserve up` (1 prefill + 2 decode pods, real processes,
gRPC and NIXL over shared memory): with greedy and seeded streams in flight,
a decode pod killed or frozen mid-stream, the prefill pod killed or frozen
between its Prefill and the decoder's READ and during the READ, a router
killed and restarted, and clients hanging up mid-stream, mid-prefill and
mid-READ. Each streams to completion token-identical to the no-fault run
(or, where the client or the router is gone, ends with a clean error), and
each ends with 0 KV blocks, 0 leases and 0 requests on every surviving pod.

READs here are slowed by the test-only transport hook (``SPLITSERVE_KV_FAULTS
="stall=1"``: every READ waits a second before it is posted; outputs are
unaffected), which gives the tests a window to kill the prefill pod or hang
up while a READ is in flight. Every prompt carries a fresh ``cache_salt``, so
no pod's prefix cache short-cuts a READ.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos_support import (
    LONG, SHORT, Outcome, Streams, assert_identical, assert_pods_clean, freeze_a_busy_pod, frozen, load_of,
    pods_counter, pods_of, reference_outcomes, router_counter, up_cluster, wait_replaced, wait_router_ready,
    wait_until,
)
from e2e_support import KV_CACHE_ARGS, UpProcess
from splitserve.local.probes import free_port, is_healthy

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]

LEASE_S = 4  # a lease nobody claims (its router or client is gone) is freed this soon
POD_ARGS = [*KV_CACHE_ARGS, "--max-model-len", "512", "--kv-lease-seconds", str(LEASE_S),
            "--kv-transfer-timeout", "5", "--kv-claim-timeout", "10", "--shutdown-grace-seconds", "0.3"]
ROUTER_ARGS = ["--pd-threshold-tokens=0"]  # every request goes prefill -> KV handoff -> decode
STALL_S = 1.0
RECOMPUTED = {"role": "decode", "reason": "kv_pull_recomputed"}


@pytest.fixture(scope="module")
def up(llama_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    with up_cluster(llama_model, tmp_path_factory.mktemp("chaos"), prefill=1, decode=2, pod_args=POD_ARGS,
                    router_args=ROUTER_ARGS, env={"SPLITSERVE_KV_FAULTS": f"stall={STALL_S}"}) as process:
        yield process


@pytest.fixture(scope="module")
def reference(up: UpProcess) -> dict[int, Outcome]:
    return reference_outcomes(up)


@pytest.fixture
def cluster(up: UpProcess, reference: dict[int, Outcome]) -> UpProcess:
    """The up with every pod ready in the router (a previous test's replacement included)."""
    wait_router_ready(up)
    return up


def streams(up: UpProcess, specs, salt: str, **kwargs) -> Streams:
    return Streams(up.base_url, str(up.model), specs, salt, **kwargs)


def stalled_reads(up: UpProcess) -> float:
    return pods_counter(pods_of(up, "decode"), "splitserve:kv_transfer_faults_injected_total", fault="stall")


def disaggregated(up: UpProcess) -> float:
    return router_counter(up.port, "splitserve:pd_decisions_total", path="disaggregated")


def test_decode_pod_kill_9_mid_stream_continues_on_the_other(cluster: UpProcess, reference) -> None:
    up = cluster
    moved = router_counter(up.port, "splitserve:router_retries_total", role="decode")
    decode = pods_of(up, "decode")
    running = streams(up, [*LONG, *LONG], "decode-kill")
    running.wait_chunks(2)
    victim, held = freeze_a_busy_pod(decode, running)  # so it cannot finish them before the kill
    os.kill(victim["pid"], signal.SIGKILL)
    outcomes = running.results()
    assert_identical(outcomes, reference)
    assert router_counter(up.port, "splitserve:router_retries_total", role="decode") >= moved + len(held)
    wait_replaced(up, victim)
    assert f"{victim['name']} exited with code -9; replacing it" in up.events()
    assert_pods_clean(up)


def test_prefill_pod_kill_9_after_prefill_before_the_read_recomputes(cluster: UpProcess, reference) -> None:
    """Both decode pods frozen while the Prefill runs, so its KV handle waits
    unclaimed; the prefill pod dies; thawed, the decoders' ClaimKV finds no
    pod and each recomputes the prompt itself."""
    up = cluster
    prefill = pods_of(up, "prefill")[0]
    recomputed, handed_off = router_counter(up.port, "splitserve:router_retries_total", **RECOMPUTED), disaggregated(up)
    with frozen([p["pid"] for p in pods_of(up, "decode")]):
        running = streams(up, SHORT, "before-read")
        wait_until(lambda: disaggregated(up) >= handed_off + len(SHORT), 4, "both Prefills returned")
        assert router_counter(prefill["http_port"], "splitserve:kv_blocks_leased") > 0
        os.kill(prefill["pid"], signal.SIGKILL)
    assert_identical(running.results(), reference)
    assert router_counter(up.port, "splitserve:router_retries_total", **RECOMPUTED) >= recomputed + len(SHORT)
    wait_replaced(up, prefill)
    assert_pods_clean(up)


def test_prefill_pod_kill_9_during_the_read_recomputes(cluster: UpProcess, reference) -> None:
    """The decoders have claimed their leases and their READs are in flight
    (stalled by the hook) when the prefill pod dies."""
    up = cluster
    prefill = pods_of(up, "prefill")[0]
    recomputed, stalls = router_counter(up.port, "splitserve:router_retries_total", **RECOMPUTED), stalled_reads(up)
    running = streams(up, SHORT, "during-read")
    wait_until(lambda: stalled_reads(up) >= stalls + len(SHORT), 10, "both READs in flight")
    os.kill(prefill["pid"], signal.SIGKILL)
    assert_identical(running.results(), reference)
    assert router_counter(up.port, "splitserve:router_retries_total", **RECOMPUTED) >= recomputed + len(SHORT)
    wait_replaced(up, prefill)
    assert_pods_clean(up)


def test_frozen_decode_pod_times_out_then_fails_over_and_thaws_clean(cluster: UpProcess, reference) -> None:
    """SIGSTOP keeps the pod's sockets open: only the router's keepalive
    (pd_client: a ping unanswered for 5 s) ends its streams, which continue on the
    other decode pod. After SIGCONT the pod frees the abandoned streams."""
    up = cluster
    moved = router_counter(up.port, "splitserve:router_retries_total", role="decode")
    decode = pods_of(up, "decode")
    running = streams(up, [*LONG, *LONG], "decode-freeze")
    running.wait_chunks(2)
    victim, held = freeze_a_busy_pod(decode, running)
    try:
        outcomes = running.results()
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
    assert_identical(outcomes, reference)
    assert router_counter(up.port, "splitserve:router_retries_total", role="decode") >= moved + len(held)
    assert victim["name"] in {p["name"] for p in pods_of(up, "decode")}  # thawed, not replaced
    wait_router_ready(up)
    assert_pods_clean(up)


def test_frozen_prefill_pod_leases_are_recomputed_and_never_served_after_sigcont(
        cluster: UpProcess, reference) -> None:
    """The prefill pod freezes holding two granted leases; the decoders' ClaimKV
    times out and they recompute. Thawed (past the leases' deadlines), the pod
    answers a late ClaimKV NOT_FOUND and frees the leases: no READ ever
    copies from them, and the same incarnation serves new handoffs."""
    up = cluster
    prefill = pods_of(up, "prefill")[0]
    decode = pods_of(up, "decode")
    incarnation = load_of(prefill).incarnation_id
    recomputed, handed_off = router_counter(up.port, "splitserve:router_retries_total", **RECOMPUTED), disaggregated(up)
    pulled = pods_counter(decode, "splitserve:kv_transfer_bytes_total")
    with frozen([p["pid"] for p in decode]):
        running = streams(up, SHORT, "prefill-freeze")
        wait_until(lambda: disaggregated(up) >= handed_off + len(SHORT), 4, "both Prefills returned")
        os.kill(prefill["pid"], signal.SIGSTOP)
    try:
        assert_identical(running.results(), reference)
        assert pods_counter(decode, "splitserve:kv_transfer_bytes_total") == pulled, "a READ copied a frozen lease"
        assert router_counter(up.port, "splitserve:router_retries_total", **RECOMPUTED) >= recomputed + len(SHORT)
    finally:
        os.kill(prefill["pid"], signal.SIGCONT)
    wait_router_ready(up)
    assert_pods_clean(up)
    assert pods_counter(decode, "splitserve:kv_transfer_bytes_total") == pulled
    assert load_of(prefill).incarnation_id == incarnation  # the same process, not a replacement
    assert_identical(streams(up, SHORT, "after-thaw").results(), reference)
    assert pods_counter(decode, "splitserve:kv_transfer_bytes_total") > pulled  # it hands off again
    assert_pods_clean(up)


def test_router_kill_9_gives_errors_not_hangs_and_a_restarted_router_serves(
        cluster: UpProcess, reference, tmp_path: Path) -> None:
    """A second router on the up's pods file (file discovery), killed mid-stream
    and started again on the same port."""
    up = cluster
    port = free_port()
    argv = [sys.executable, "-m", "splitserve", "router", "--model", str(up.model), "--host", "127.0.0.1",
            "--port", str(port), "--discovery", "file", "--discovery-file", str(up.state_dir / "pods.json"),
            *ROUTER_ARGS]

    def start() -> subprocess.Popen[bytes]:
        with open(tmp_path / "router.log", "ab") as log:
            router = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: router.poll() is None and is_healthy("127.0.0.1", port), 120, "the router", 0.2)
        wait_router_ready(up, port)
        return router

    router = start()
    try:
        running = Streams(f"http://127.0.0.1:{port}/v1", str(up.model), [*LONG, *LONG], "router-kill")
        running.wait_chunks(2)
        router.kill()
        in_flight = [not done for done in running.done]
        router.wait(10)
        outcomes = running.results(timeout=30)  # the clients see the connection drop, at once
        summary = [(o.error and o.error[:80], len(o.tokens), o.seconds) for o in outcomes]
        assert any(in_flight), summary
        # A stream that ended before the kill (they take about a second here) must be whole.
        assert_identical([o for o, cut in zip(outcomes, in_flight) if not cut], reference)
        assert all(o.error and "Timeout" not in o.error for o, cut in zip(outcomes, in_flight) if cut), summary
        assert_pods_clean(up)  # the pods freed the orphaned streams
        router = start()
        after = Streams(f"http://127.0.0.1:{port}/v1", str(up.model), [*SHORT, *LONG], "router-restart")
        assert_identical(after.results(), reference)
    finally:
        router.terminate()
        code = router.wait(60)
    assert code == 0
    assert_pods_clean(up)


def test_clients_hang_up_mid_stream_mid_prefill_and_mid_read(cluster: UpProcess, reference) -> None:
    up = cluster
    prefill = pods_of(up, "prefill")[0]
    # Mid-stream: after a few chunks of long streams.
    gone = streams(up, [*LONG, *LONG], "hangup-stream", stop_after_chunks=4).results()
    assert all(o.disconnected for o in gone)
    assert_pods_clean(up)
    # Mid-prefill: the prefill pod is frozen, so the Prefill calls are still pending.
    handed_off = disaggregated(up)
    decode_only = router_counter(up.port, "splitserve:pd_decisions_total", path="decode_only")
    with frozen([prefill["pid"]]):
        waiting = streams(up, SHORT, "hangup-prefill")
        time.sleep(0.5)
        waiting.hang_up()
        assert all(o.disconnected for o in waiting.results())
    # Neither Prefill returned nor fell back to decode-only: both were still at the prefill pod.
    assert disaggregated(up) == handed_off
    assert router_counter(up.port, "splitserve:pd_decisions_total", path="decode_only") == decode_only
    wait_router_ready(up)
    assert_pods_clean(up)  # an aborted Prefill leaves no block; a late lease expires
    # Mid-READ: the READs are in flight (stalled) when the clients go.
    stalls = stalled_reads(up)
    reading = streams(up, SHORT, "hangup-read")
    wait_until(lambda: stalled_reads(up) >= stalls + len(SHORT), 10, "both READs in flight")
    reading.hang_up()
    assert all(o.disconnected for o in reading.results())
    assert_pods_clean(up)
    # The cluster still serves exactly.
    assert_identical(streams(up, SHORT, "after-hangups").results(), reference)
    assert_pods_clean(up)
