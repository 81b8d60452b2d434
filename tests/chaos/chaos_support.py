"""Shared helpers of the chaos tests (no tests here): streaming completions on
a thread of their own whose progress the test watches while it kills or
freezes processes, the no-fault reference, and the end-of-test checks."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import openai
from e2e_support import UpProcess, metric_values, pod_load, wait_pods_clean
from process_probe import alive
from splitserve.local.probes import router_pod_states


@dataclass(frozen=True)
class Spec:
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None


# Greedy and seeded, short and long (a long one streams for seconds on 2 cores).
SPECS = (Spec("The river Danube flows through ten countries and four capitals; " * 2, 24),
         Spec("Shipping log of the northern port, day 12: three barges, one tug, ", 24, 0.9, 2),
         Spec("Long log A: the barge left at dawn; ", 460),
         Spec("Long log B: a tug waits at the lock; ", 460, 0.9, 4))
SHORT = (0, 1)
LONG = (2, 3)


@dataclass(frozen=True)
class Outcome:
    """One stream as the client saw it. ``disconnected``: the client hung up on purpose."""

    spec: int
    text: str = ""
    tokens: tuple[str, ...] = ()
    finish: str | None = None
    error: str | None = None
    disconnected: bool = False
    seconds: float = 0.0  # start to end, as the client saw it


async def stream_completion(client: openai.AsyncOpenAI, model: str, index: int, salt: str,
                            progress: list[int], slot: int, stop_after_chunks: int | None = None) -> Outcome:
    """Stream ``SPECS[index]`` (``cache_salt`` ``salt``: cold prefix caches
    everywhere); ``progress[slot]`` counts chunks; hang up after
    ``stop_after_chunks`` when given."""
    spec = SPECS[index]
    text: list[str] = []
    tokens: list[str] = []
    finish = None
    try:
        stream = await client.completions.create(
            model=model, prompt=spec.prompt, max_tokens=spec.max_tokens, temperature=spec.temperature,
            seed=spec.seed, stream=True, logprobs=1, extra_body={"ignore_eos": True, "cache_salt": salt})
        async for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.text)
                if choice.logprobs is not None and choice.logprobs.tokens:
                    tokens += choice.logprobs.tokens
                finish = choice.finish_reason or finish
            progress[slot] += 1
            if stop_after_chunks is not None and progress[slot] >= stop_after_chunks:
                await stream.close()
                return Outcome(index, "".join(text), tuple(tokens), disconnected=True)
    except openai.APIStatusError as exc:
        return Outcome(index, error=f"HTTP {exc.status_code}: {exc.message}")
    except (openai.APIError, httpx.HTTPError) as exc:  # a body cut mid-stream is httpx's own error
        return Outcome(index, error=repr(exc))
    return Outcome(index, "".join(text), tuple(tokens), finish)


@dataclass
class Streams:
    """Streams of ``specs`` (indices into SPECS) started at once through
    ``base_url`` on a thread with its own event loop. The client hangs up
    (a cancelled request) after ``stop_after_chunks``, or on ``hang_up()``."""

    base_url: str
    model: str
    specs: Sequence[int]
    salt: str
    stop_after_chunks: int | None = None
    timeout_s: float = 120.0
    progress: list[int] = field(init=False)
    outcomes: list[Outcome] | None = field(init=False, default=None)
    done: list[bool] = field(init=False)  # per stream: ended (any way)
    _thread: threading.Thread = field(init=False)
    _tasks: list[asyncio.Task[Outcome]] = field(init=False, default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = field(init=False, default=None)
    _started: threading.Event = field(init=False, default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.progress = [0] * len(self.specs)
        self.done = [False] * len(self.specs)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        self._started.wait(10)

    async def _main(self) -> None:
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key="unused", max_retries=0,
                                    timeout=self.timeout_s)

        async def one(slot: int, index: int) -> Outcome:
            started = time.monotonic()
            try:
                outcome = await stream_completion(client, self.model, index, f"{self.salt}-{slot}", self.progress,
                                                  slot, self.stop_after_chunks)
            except asyncio.CancelledError:
                outcome = Outcome(index, disconnected=True)
            self.done[slot] = True
            return replace(outcome, seconds=round(time.monotonic() - started, 2))

        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.create_task(one(s, i)) for s, i in enumerate(self.specs)]
        self._started.set()
        try:
            self.outcomes = list(await asyncio.gather(*self._tasks))
        finally:
            await client.close()

    def hang_up(self) -> None:
        """Every client still streaming closes its connection now."""
        assert self._loop is not None
        for task in self._tasks:
            self._loop.call_soon_threadsafe(task.cancel)

    def wait_chunks(self, count: int, timeout: float = 60.0) -> None:
        """Until every stream has had ``count`` chunks."""
        wait_until(lambda: min(self.progress) >= count, timeout, f"every stream past {count} chunks")

    def results(self, timeout: float | None = None) -> list[Outcome]:
        self._thread.join(timeout if timeout is not None else self.timeout_s + 30)
        assert not self._thread.is_alive() and self.outcomes is not None, "a stream hung"
        return self.outcomes


@contextmanager
def up_cluster(model: Path, tmp: Path, **kwargs: Any) -> Iterator[UpProcess]:
    """A module's ``splitserve up`` (``UpProcess`` arguments); afterwards it
    must have exited 0 and left none of its pods running."""
    process = UpProcess(model, tmp, **kwargs)
    process.start()
    pids: list[int] = []
    try:
        yield process
        pids = [pod["pid"] for pod in pods_of(process)]
    finally:
        code = process.stop()
    assert code == 0, process.events()[-3000:]
    time.sleep(0.5)
    assert not [pid for pid in pids if alive(pid)], "pods outlived `splitserve up`"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(poll_s)


def reference_outcomes(up: UpProcess) -> dict[int, Outcome]:
    """Every spec once on the quiet cluster: the no-fault output."""
    outcomes = Streams(up.base_url, str(up.model), range(len(SPECS)), "reference").results()
    for i, o in enumerate(outcomes):
        assert o.error is None and o.finish == "length" and len(o.tokens) == SPECS[i].max_tokens, o
    assert len({o.text for o in outcomes}) == len(SPECS), "the specs must give distinct outputs"
    return dict(enumerate(outcomes))


def assert_identical(outcomes: Sequence[Outcome], reference: dict[int, Outcome]) -> None:
    """Every stream complete and token-identical to the no-fault run."""
    failed = [o for o in outcomes if o.error or o.disconnected]
    assert not failed, f"{len(failed)} of {len(outcomes)} streams failed: {failed[:3]}"
    for o in outcomes:
        want = reference[o.spec]
        assert (o.tokens, o.text, o.finish) == (want.tokens, want.text, want.finish), f"spec {o.spec} differs"


def pods_of(up: UpProcess, role: str | None = None) -> list[dict]:
    """The up's pods (``splitserve status`` entries) from its control endpoint
    (``UpProcess.pods`` starts the CLI: seconds on a busy machine)."""
    pools = up.control().status()["pools"]
    return [pod for name, pool in pools.items() if role in (None, name) for pod in pool["pods"]]


def assert_pods_clean(up: UpProcess, timeout: float = 30.0) -> None:
    """No KV block, lease or request left on any pod of the up (the survivors and replacements)."""
    readings = wait_pods_clean(pods_of(up), timeout)
    assert all(not any(r) for r in readings.values()), f"(leased, usage, used, leased, requests): {readings}"


def wait_router_ready(up: UpProcess, port: int | None = None, timeout: float = 90.0) -> None:
    """Until ``splitserve up`` has every pool at its count and the router
    (``port``: another router on the same pods) routes to every pod."""
    control = up.control()
    control.wait_converged(None, timeout)
    pools = control.status()["pools"]
    want = {role: pool["replicas"] for role, pool in pools.items()}

    def ready() -> bool:
        states = router_pod_states("127.0.0.1", port or up.port) or {}
        return all(states.get(role, {}).get("ready", 0) == n for role, n in want.items())

    wait_until(ready, timeout, f"the router to see {want} ready", poll_s=0.1)


def wait_replaced(up: UpProcess, victim: dict, timeout: float = 90.0) -> None:
    """Until ``splitserve up`` has reaped the killed pod ``victim`` and its
    replacement is ready in the router (right after a kill both may still
    list the dead pod as ready)."""
    wait_until(lambda: victim["name"] not in {p["name"] for p in pods_of(up)}, 30, f"{victim['name']} reaped", 0.1)
    wait_router_ready(up, timeout=timeout)


def router_counter(port: int, name: str, **labels: str) -> float:
    samples = metric_values(port, name)
    return sum(v for k, v in samples.items() if all(f'{lk}="{lv}"' in k for lk, lv in labels.items()))


def pods_counter(pods: Sequence[dict], name: str, **labels: str) -> float:
    """``name`` summed over ``pods`` (``splitserve status`` entries)."""
    return sum(router_counter(p["http_port"], name, **labels) for p in pods)


def load_of(pod: dict):  # -> LoadSnapshot
    return asyncio.run(pod_load(pod["address"]))


def freeze_a_busy_pod(pods: Sequence[dict], streams: Streams, timeout: float = 30.0) -> tuple[dict, list[int]]:
    """SIGSTOP the pod of ``pods`` running most of ``streams`` (its /metrics)
    and return it with the slots of the streams it holds: those that stop
    moving while it is frozen (a stream ends in about a second here, so the
    pod is frozen before it is judged, and SIGCONT'd and tried again if it
    held none of them)."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline and streams.outcomes is None, (
            f"no pod was caught running a stream: chunks {streams.progress}, outcomes "
            f"{streams.outcomes and [(o.error, len(o.tokens), o.seconds) for o in streams.outcomes]}")
        running = [(router_counter(p["http_port"], "splitserve:num_requests_running"), p) for p in pods]
        count, pod = max(running, key=lambda r: r[0])
        if count == 0:
            time.sleep(0.01)
            continue
        os.kill(pod["pid"], signal.SIGSTOP)
        time.sleep(0.3)
        before = list(streams.progress)
        time.sleep(0.3)
        held = [slot for slot, (a, b) in enumerate(zip(before, streams.progress))
                if a == b and not streams.done[slot]]
        if held:
            return pod, held
        os.kill(pod["pid"], signal.SIGCONT)


@contextmanager
def frozen(pids: Sequence[int]) -> Iterator[None]:
    """SIGSTOP ``pids`` for the block (SIGCONT after, whatever happens)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)

