"""AsyncEngine with the fake runner: streams, aborts, cancellation, shutdown."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from test_scheduler_fakes import FakeRunner, make_core, next_token

from splitserve.engine.async_engine import AsyncEngine, EngineDeadError
from splitserve.engine.errors import EmptyPromptError
from splitserve.engine.outputs import EngineOutput
from splitserve.engine.sampling_params import SamplingParams

VOCAB = 50
pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


class SlowRunner(FakeRunner):
    """Steps take a little time so tests can act mid-stream."""

    def execute(self, so):  # noqa: ANN001, ANN201
        time.sleep(0.002)
        return super().execute(so)


def reference(prompt: list[int], seed: int, n: int) -> list[int]:
    context, out = list(prompt), []
    for i in range(n):
        out.append(next_token(context, seed, i, VOCAB))
        context.append(out[-1])
    return out


def prompt_of(length: int, offset: int = 0) -> list[int]:
    return [(offset + 7 * i) % VOCAB for i in range(length)]


@pytest.fixture
def engine():  # noqa: ANN201
    core = make_core(max_num_seqs=4, max_num_batched_tokens=16)
    core.runner = SlowRunner(core.runner.num_blocks, core.runner.block_size, core.runner.max_model_len, VOCAB)
    eng = AsyncEngine(core)
    yield eng
    eng.shutdown()


async def settle(engine: AsyncEngine) -> None:
    """Wait (briefly) until the engine thread has nothing left -- aborts must
    have freed everything by themselves, before shutdown would -- then check
    leaks."""
    for _ in range(200):
        stats = engine.stats().scheduler
        if stats.num_running == stats.num_waiting == stats.num_waiting_for_remote_kv == 0 and stats.num_held == 0:
            break
        await asyncio.sleep(0.005)
    else:
        raise AssertionError(f"requests still live: {engine.stats().scheduler}")
    assert stats.num_free_blocks == stats.num_total_blocks
    engine.shutdown()
    engine.core.check_no_leaks()
    assert not engine.core.scheduler.requests


async def collect(stream) -> tuple[list[int], EngineOutput]:  # noqa: ANN001
    tokens: list[int] = []
    last = None
    async for out in stream:
        tokens.extend(out.new_token_ids)
        last = out
    return tokens, last


async def test_concurrent_streams_match_reference(engine: AsyncEngine) -> None:
    streams = [
        await engine.submit(f"r{i}", prompt_of(5 + i, i), SamplingParams(seed=i, max_tokens=8 + i))
        for i in range(6)
    ]
    results = await asyncio.gather(*(collect(s) for s in streams))
    for i, (tokens, last) in enumerate(results):
        assert tokens == reference(prompt_of(5 + i, i), i, 8 + i)
        assert last.finished and last.finish_reason == "length"
    assert engine.stats().generation_tokens_total == sum(8 + i for i in range(6))
    await settle(engine)


async def test_abort_mid_stream_from_another_thread(engine: AsyncEngine) -> None:
    stream = await engine.submit("a", prompt_of(5), SamplingParams(seed=1, max_tokens=200, ignore_eos=True))
    keep = await engine.submit("b", prompt_of(6, 1), SamplingParams(seed=2, max_tokens=10))
    got = 0
    last = None
    async for out in stream:
        got += len(out.new_token_ids)
        last = out
        if got == 3:
            threading.Thread(target=engine.abort, args=("a",)).start()
    assert last.finished and last.finish_reason == "abort" and 3 <= got < 200
    tokens, _ = await collect(keep)
    assert tokens == reference(prompt_of(6, 1), 2, 10)
    await settle(engine)


async def test_cancelling_the_consumer_aborts(engine: AsyncEngine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        stream = await engine.submit("c", prompt_of(5), SamplingParams(seed=1, max_tokens=200))
        async for _ in stream:
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle(engine)


async def test_closing_the_stream_early_aborts(engine: AsyncEngine) -> None:
    stream = await engine.submit("d", prompt_of(5), SamplingParams(seed=1, max_tokens=200))
    async for _ in stream:
        break
    await stream.aclose()
    await settle(engine)


async def test_add_errors_reach_the_submitter(engine: AsyncEngine) -> None:
    with pytest.raises(EmptyPromptError):
        await engine.submit("e", [], SamplingParams())
    ok = await engine.submit("f", prompt_of(3), SamplingParams(seed=3, max_tokens=4))
    tokens, _ = await collect(ok)
    assert tokens == reference(prompt_of(3), 3, 4)
    await settle(engine)


async def test_runner_failure_fails_streams_and_engine_goes_on(engine: AsyncEngine) -> None:
    engine.core.runner.fail_next = True
    stream = await engine.submit("g", prompt_of(3), SamplingParams(seed=1, max_tokens=4))
    with pytest.raises(RuntimeError, match="injected"):
        await collect(stream)
    again = await engine.submit("h", prompt_of(3), SamplingParams(seed=1, max_tokens=4))
    tokens, _ = await collect(again)
    assert tokens == reference(prompt_of(3), 1, 4)
    await settle(engine)


async def test_prefill_only_and_remote_kv_commands(engine: AsyncEngine) -> None:
    stream = await engine.submit("p", prompt_of(9), SamplingParams(seed=4, max_tokens=5), prefill_only=True)
    first, last = await collect(stream)
    assert last.finished and last.finish_reason is None and last.held_block_ids
    engine.release_held_blocks("p")

    remote = await engine.submit(
        "q", prompt_of(9, 2), SamplingParams(seed=4, max_tokens=5),
        output_token_ids=reference(prompt_of(9, 2), 4, 1), num_remote_tokens=9,
    )
    notice = await remote.__anext__()
    assert notice.remote_kv_load is not None and notice.remote_kv_load.block_ids
    engine.finish_remote_kv("q", ok=False)  # nothing pulled: recompute
    tokens, _ = await collect(remote)
    assert tokens == reference(prompt_of(9, 2), 4, 5)[1:]
    await settle(engine)


async def test_shutdown_ends_open_streams_and_refuses_new_ones() -> None:
    core = make_core()
    core.runner = SlowRunner(core.runner.num_blocks, core.runner.block_size, core.runner.max_model_len, VOCAB)
    engine = AsyncEngine(core)
    stream = await engine.submit("s", prompt_of(4), SamplingParams(seed=1, max_tokens=500, ignore_eos=True))
    await stream.__anext__()
    await asyncio.to_thread(engine.shutdown)
    assert not engine._thread.is_alive()
    _, last = await collect(stream)
    assert last.finish_reason == "abort"
    with pytest.raises(EngineDeadError):
        await engine.submit("t", prompt_of(4), SamplingParams())
    core.check_no_leaks()


async def test_idle_engine_sleeps() -> None:
    core = make_core()
    engine = AsyncEngine(core)
    await asyncio.sleep(0.05)
    before = engine.core.stats().num_steps
    await asyncio.sleep(0.05)
    assert engine.core.stats().num_steps == before == 0
    engine.shutdown()
    core.check_no_leaks()


async def test_after_step_hooks_run_on_the_engine_thread_and_a_failing_one_is_contained() -> None:
    core = make_core(max_num_seqs=4, max_num_batched_tokens=16)
    seen: list[tuple[str, int]] = []

    def record(c) -> None:  # noqa: ANN001
        assert c is core
        seen.append((threading.current_thread().name, c.stats().scheduler.num_running))

    def broken(_c) -> None:  # noqa: ANN001
        raise RuntimeError("observer bug")

    eng = AsyncEngine(core, after_step=[broken, record])
    try:
        stream = await eng.submit("r", prompt_of(5), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        tokens = [t async for out in stream for t in out.new_token_ids]
        assert len(tokens) == 4
        await settle(eng)
        assert len(seen) >= 4, "one call per step (prefill + 3 decodes at least)"
        assert {name for name, _ in seen} == {"splitserve-engine"}
    finally:
        eng.shutdown()


async def test_from_engine_args_loads_the_model_on_the_engine_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # One OpenMP pool per process: the thread that loads the model (and so
    # runs torch's parallel regions first) must be the one that steps it.
    import splitserve.engine.model_runner as model_runner

    template = make_core()
    loaded_on: list[str] = []

    def load(_args):  # noqa: ANN001, ANN202
        loaded_on.append(threading.current_thread().name)
        return template.runner

    monkeypatch.setattr(model_runner, "load_model_runner", load)
    engine = AsyncEngine.from_engine_args(template.engine_args)
    try:
        stream = await engine.submit("r", prompt_of(5), SamplingParams(seed=3, max_tokens=3, ignore_eos=True))
        assert [t async for out in stream for t in out.new_token_ids] == reference(prompt_of(5), 3, 3)
        assert loaded_on == ["splitserve-engine"]
    finally:
        engine.shutdown()
    engine.core.check_no_leaks()


async def test_a_failing_build_raises_in_the_constructor() -> None:
    def build():  # noqa: ANN202
        raise RuntimeError("no weights")

    def engine_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "splitserve-engine"}

    before = engine_threads()
    with pytest.raises(RuntimeError, match="no weights"):
        AsyncEngine(build)
    assert engine_threads() <= before, "the failed engine's thread is gone"
