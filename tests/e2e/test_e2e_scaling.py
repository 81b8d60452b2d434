"""`splitserve up` keeps its pools like Deployments, driven by the real CLI
(`splitserve scale|rollout|status`) under a steady load of concurrent greedy
and seeded streaming completions: decode scaled 1 -> 3 -> 1, rolling
restarts of prefill and decode, prefill scaled to 0 and back, decode at 0
with requests queued in the router (its bound hit on purpose), and a
`kill -9` of a decode pod under load. Every request completes with exactly
the output of a quiet cluster (text, finish reason, per-token logprobs), no
5xx but the queue's own 503s, drained pods exit 0, and after each step every
pod holds no KV block and no lease.

Pods drain after a short notice (``NOTICE``) with a short grace (``GRACE``) so the long streams of a drained
decode pod end with UNAVAILABLE and move to another pod (the router's
mid-stream failover), while short ones finish within it.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from process_probe import alive
from e2e_support import KV_CACHE_ARGS, UpProcess, metric_values, pod_load, wait_pods_clean

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

GRACE = 0.3
# A short notice: the drain of a pod cuts the long streams it runs (the router
# then moves them) rather than letting them run on.
NOTICE = 0.1
# The streams that must outlast a drain: seconds each on the tiny model (whose
# checkpoint here has room for them: MAX_POSITIONS), against a notice + grace
# of 0.4 s. At 1,800 tokens four of them under the steady load took 2.5 min
# of the kill test on a 2-core VM.
LONG_TOKENS = 900
MAX_POSITIONS = 2048
MAX_QUEUED = 3
POD_ARGS = [*KV_CACHE_ARGS, "--max-model-len", str(MAX_POSITIONS), "--shutdown-grace-seconds", str(GRACE),
            "--kv-lease-seconds", "10"]
ROUTER_ARGS = ["--pd-threshold-tokens=0", f"--max-queued-requests={MAX_QUEUED}", "--queue-timeout-seconds=300"]


@dataclass(frozen=True)
class Spec:
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None


_PROMPTS = ("The river Danube flows through ten countries and four capitals; " * 2,
            "Shipping log of the northern port, day 12: three barges, one tug, ",
            "Once upon a time a very small tokenizer met a random model. " * 3)
SPECS = (Spec(_PROMPTS[0], 24), Spec(_PROMPTS[0], 160, 0.9, 1), Spec(_PROMPTS[1], 160),
         Spec(_PROMPTS[1], 24, 0.9, 2), Spec(_PROMPTS[2], 96), Spec(_PROMPTS[2], 96, 0.9, 3),
         # Long streams (seconds here) that outlast a drained pod's grace; prompts
         # of their own, so no decode pod's prefix cache pulls them all to one pod.
         Spec("Long log A: the barge left at dawn; ", LONG_TOKENS),
         Spec("Long log B: a tug waits at the lock; ", LONG_TOKENS),
         Spec("Long log C: fog over the harbour; ", LONG_TOKENS, 0.9, 4),
         Spec("Long log D: the crane is idle; ", LONG_TOKENS, 0.9, 5))
STEADY = 6  # the steady load rotates over SPECS[:STEADY]
LONG = (6, 7, 8, 9)
LONG_GREEDY_AND_SEEDED = (6, 8)


@dataclass(frozen=True)
class Outcome:
    spec: int
    text: str = ""
    logprobs: tuple[float, ...] = ()
    finish: str | None = None
    error: str | None = None
    status: int | None = None


async def complete(client: openai.AsyncOpenAI, model: str, index: int) -> Outcome:
    spec = SPECS[index]
    text: list[str] = []
    logprobs: list[float] = []
    finish = None
    try:
        stream = await client.completions.create(
            model=model, prompt=spec.prompt, max_tokens=spec.max_tokens, temperature=spec.temperature,
            seed=spec.seed, stream=True, logprobs=1, extra_body={"ignore_eos": True})
        async for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.text)
                if choice.logprobs is not None and choice.logprobs.token_logprobs:
                    logprobs += choice.logprobs.token_logprobs
                finish = choice.finish_reason or finish
    except openai.APIStatusError as exc:
        return Outcome(index, error=f"HTTP {exc.status_code}: {exc.message}", status=exc.status_code)
    except openai.APIError as exc:
        return Outcome(index, error=repr(exc))
    return Outcome(index, "".join(text), tuple(logprobs), finish)


class SteadyLoad:
    """``concurrency`` workers streaming the specs back to back (each its own
    rotation) on a thread of their own until the ``with`` block ends; a
    request in flight then still completes."""

    def __init__(self, up: UpProcess, concurrency: int = 3) -> None:
        self.up = up
        self.concurrency = concurrency
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.outcomes:  # the load is on before the step under test begins
            assert time.monotonic() < deadline and self._thread.is_alive()
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(300)
        assert not self._thread.is_alive()

    async def _main(self) -> None:
        client = openai.AsyncOpenAI(base_url=self.up.base_url, api_key="unused", max_retries=0, timeout=300)

        async def worker(first: int) -> None:
            i = first
            while not self._stop.is_set():
                self.outcomes.append(await complete(client, str(self.up.model), i % STEADY))
                i += 1

        try:
            await asyncio.gather(*(worker(w * 2) for w in range(self.concurrency)))
        finally:
            await client.close()


def assert_exact(outcomes: Sequence[Outcome], reference: dict[int, Outcome], at_least: int = 1) -> None:
    failed = [o for o in outcomes if o.error]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed, e.g. {failed[:3]}"
    assert len(outcomes) >= at_least, f"only {len(outcomes)} requests ran"
    for o in outcomes:
        want = reference[o.spec]
        assert (o.text, o.finish, len(o.logprobs)) == (want.text, want.finish, len(want.logprobs)), o.spec
        assert max(abs(a - b) for a, b in zip(o.logprobs, want.logprobs)) <= 1e-3, o.spec


def assert_pods_clean(up: UpProcess) -> None:
    readings = wait_pods_clean(up.pods())
    assert all(not any(r) for r in readings.values()), f"(leased, usage, used, leased, requests): {readings}"


def router_counter(up: UpProcess, name: str, **labels: str) -> float:
    samples = metric_values(up.port, name)
    return sum(v for k, v in samples.items() if all(f'{lk}="{lv}"' in k for lk, lv in labels.items()))


def drained_exit_codes(up: UpProcess) -> list[int]:
    return [int(code) for code in re.findall(r"exited with code (-?\d+) after draining", up.events())]


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import checkpoints

    return checkpoints.llama(tmp_path_factory.mktemp("llama-long"), max_position_embeddings=MAX_POSITIONS)


@pytest.fixture(scope="module")
def up(long_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    process = UpProcess(long_llama, tmp_path_factory.mktemp("scaling"), pod_args=POD_ARGS, router_args=ROUTER_ARGS,
                        up_args=["--drain-notice", str(NOTICE)])
    process.start()
    try:
        yield process
    finally:
        pids = [pod["pid"] for pod in _pods_or_none(process)]
        code = process.stop()
    assert code == 0, process.events()[-3000:]
    time.sleep(0.5)
    assert not [pid for pid in pids if alive(pid)], "pods outlived `splitserve up`"


@pytest.fixture(scope="module")
def reference(up: UpProcess) -> dict[int, Outcome]:
    """Each spec once on the quiet cluster (1 prefill + 1 decode, no fault),
    all at once: a batch of its own, unlike any the steps below make."""

    async def run() -> dict[int, Outcome]:
        client = openai.AsyncOpenAI(base_url=up.base_url, api_key="unused", max_retries=0, timeout=120)
        try:
            outcomes = await asyncio.gather(*(complete(client, str(up.model), i) for i in range(len(SPECS))))
            return dict(enumerate(outcomes))
        finally:
            await client.close()

    outcomes = asyncio.run(run())
    for i, o in outcomes.items():
        assert o.error is None and o.finish == "length" and len(o.logprobs) == SPECS[i].max_tokens, o
    assert len({o.text for o in outcomes.values()}) == len(SPECS), "the specs must give distinct outputs"
    return outcomes


def test_decode_scaled_1_to_3_to_1_under_load(up: UpProcess, reference: dict[int, Outcome]) -> None:
    cut = router_counter(up, "splitserve:router_retries_total", role="decode", reason="unavailable")
    with SteadyLoad(up) as load:
        up.cli("scale", "decode=3", "--wait")
        assert len(up.pods("decode")) == 3
        time.sleep(2)  # traffic reaches the new pods
        # Long streams spread over the three pods, running when two of them drain:
        # those past the grace end with UNAVAILABLE and continue on decode-0.
        leaving = [p["address"] for p in up.pods("decode") if p["name"] != "decode-0"]
        long = _in_background(up, LONG)
        t0 = time.monotonic()
        while time.monotonic() < t0 + 10 and not all(
                asyncio.run(pod_load(a)).load.running_seqs for a in leaving):
            time.sleep(0.02)  # until each pod about to drain runs a stream
        up.control().scale({"decode": 1})  # at once: the CLI's start-up would let them finish
        print(f"scale-down {time.monotonic() - t0:.2f}s after the long streams started")
        up.cli("scale", "decode=1", "--wait")
        long_outcomes = [future.result(timeout=300) for future in long]
    assert [p["name"] for p in up.pods("decode")] == ["decode-0"]  # the newest two drained
    assert_exact(load.outcomes, reference, at_least=10)
    assert_exact(long_outcomes, reference, at_least=len(LONG))
    assert drained_exit_codes(up) == [0, 0]
    moved = router_counter(up, "splitserve:router_retries_total", role="decode", reason="unavailable") - cut
    assert moved >= 1, "no stream was cut by a drain: the failover path went untested"
    print(f"decode 1->3->1: {len(load.outcomes) + 4} requests, {moved:.0f} streams moved by a drain")
    assert_pods_clean(up)


def test_rolling_restart_of_prefill_then_decode_under_load(up: UpProcess, reference: dict[int, Outcome]) -> None:
    before = {p["name"] for p in up.pods()}
    with SteadyLoad(up) as load:
        assert "rollout complete" in up.cli("rollout", "restart", "prefill", "--wait")
        assert "rollout complete" in up.cli("rollout", "restart", "decode", "--wait")
    pools = up.status()["pools"]
    assert pools["prefill"]["revision"] == pools["decode"]["revision"] == 1
    assert not before & {p["name"] for p in up.pods()} and len(up.pods()) == 2
    assert_exact(load.outcomes, reference, at_least=10)
    assert set(drained_exit_codes(up)) == {0}
    assert_pods_clean(up)


def test_prefill_scaled_to_zero_and_back_under_load(up: UpProcess, reference: dict[int, Outcome]) -> None:
    decode_only = router_counter(up, "splitserve:pd_decisions_total", path="decode_only")
    with SteadyLoad(up) as load:
        up.cli("scale", "prefill=0", "--wait")
        assert up.pods("prefill") == []
        served = len(load.outcomes)
        while len(load.outcomes) < served + 6:  # requests keep completing with no prefill pod
            time.sleep(0.1)
        up.cli("scale", "prefill=1", "--wait")
    assert router_counter(up, "splitserve:pd_decisions_total", path="decode_only") > decode_only
    assert_exact(load.outcomes, reference, at_least=10)
    assert_pods_clean(up)


def test_decode_at_zero_queues_requests_until_it_is_scaled_back(up: UpProcess,
                                                               reference: dict[int, Outcome]) -> None:
    up.cli("scale", "decode=0", "--wait")
    waits = router_counter(up, "splitserve:router_queue_wait_seconds_count")

    async def burst() -> list[Outcome]:
        client = openai.AsyncOpenAI(base_url=up.base_url, api_key="unused", max_retries=0, timeout=300)
        try:
            tasks = [asyncio.create_task(complete(client, str(up.model), i % len(SPECS)))
                     for i in range(MAX_QUEUED + 2)]
            deadline = time.monotonic() + 60
            while (router_counter(up, "splitserve:router_queued_requests") < MAX_QUEUED
                   or sum(t.done() for t in tasks) < 2):
                assert time.monotonic() < deadline, "the requests past the queue's bound are refused at once"
                await asyncio.sleep(0.1)
            assert sum(t.done() for t in tasks) == 2  # the queued ones wait for a decode pod
            await asyncio.to_thread(up.cli, "scale", "decode=1")  # scale from zero
            return list(await asyncio.gather(*tasks))
        finally:
            await client.close()

    outcomes = asyncio.run(burst())
    refused = [o for o in outcomes if o.error]
    assert [o.status for o in refused] == [503, 503], refused
    assert_exact([o for o in outcomes if not o.error], reference, at_least=MAX_QUEUED)
    assert router_counter(up, "splitserve:router_queue_wait_seconds_count") >= waits + MAX_QUEUED
    up.cli("scale", "decode=1", "--wait")
    assert_pods_clean(up)


def test_kill_9_of_a_decode_pod_under_load_is_replaced_and_streams_continue(
        up: UpProcess, reference: dict[int, Outcome]) -> None:
    up.cli("scale", "decode=2", "--wait")
    failovers = router_counter(up, "splitserve:router_retries_total", role="decode")
    with SteadyLoad(up) as load:
        long = _in_background(up, LONG_GREEDY_AND_SEEDED)  # streams of seconds: the kill cuts one
        victim = _busiest_decode_pod(up)
        os.kill(victim["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while up.status()["pools"]["decode"]["restarts"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        up.cli("scale", "decode=2", "--wait")  # the replacement is ready and the router uses it
        served = len(load.outcomes)
        while len(load.outcomes) < served + 6:
            time.sleep(0.1)
        long_outcomes = [future.result(timeout=300) for future in long]
    names = {p["name"] for p in up.pods("decode")}
    assert victim["name"] not in names and len(names) == 2
    assert f"{victim['name']} exited with code -9; replacing it" in up.events()
    assert router_counter(up, "splitserve:router_retries_total", role="decode") > failovers
    assert_exact(load.outcomes, reference, at_least=10)
    assert_exact(long_outcomes, reference, at_least=len(LONG_GREEDY_AND_SEEDED))
    assert_pods_clean(up)


def _in_background(up: UpProcess, specs: Sequence[int]) -> list:
    """Start one streaming request per spec on its own thread; their futures."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(len(specs))

    def one(index: int) -> Outcome:
        async def run() -> Outcome:
            client = openai.AsyncOpenAI(base_url=up.base_url, api_key="unused", max_retries=0, timeout=300)
            try:
                return await complete(client, str(up.model), index)
            finally:
                await client.close()
        return asyncio.run(run())

    futures = [pool.submit(one, i) for i in specs]
    pool.shutdown(wait=False)
    return futures


def _busiest_decode_pod(up: UpProcess) -> dict:
    """A decode pod with a stream running (the kill must cut one)."""
    deadline = time.monotonic() + 30
    while True:
        pods = up.pods("decode")
        running = {p["name"]: asyncio.run(pod_load(p["address"])).load.running_seqs for p in pods}
        busiest = max(pods, key=lambda p: running[p["name"]])
        if running[busiest["name"]] > 0 or time.monotonic() > deadline:
            return busiest
        time.sleep(0.02)


def _pods_or_none(up: UpProcess) -> list[dict]:
    try:
        return up.pods()
    except AssertionError:
        return []

