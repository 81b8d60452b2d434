"""Property tests: block pool and scheduler invariants under random arrive /
abort / step / remote-KV / release sequences, on the fake runner."""
from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_scheduler_fakes import make_core, next_token

from splitserve.engine.block_pool import BlockPool
from splitserve.engine.engine_core import EngineCore
from splitserve.engine.outputs import EngineOutput
from splitserve.engine.sampling_params import SamplingParams

VOCAB = 50
BASES = [[(3 * i + k) % VOCAB for i in range(24)] for k in range(3)]

arrive = st.tuples(
    st.just("arrive"),
    st.integers(0, 2),  # shared base prefix
    st.integers(1, 20),  # prompt length
    st.integers(1, 16),  # max_tokens
    st.sampled_from(["plain", "plain", "prefill_only", "remote"]),
    st.integers(0, 2**16),  # seed
)
ops = st.lists(
    st.one_of(
        arrive,
        st.tuples(st.just("step"), st.integers(1, 6)),
        st.tuples(st.just("step"), st.integers(1, 6)),
        st.tuples(st.just("abort"), st.integers(0, 50)),
        st.tuples(st.just("kv_done"), st.integers(0, 50), st.booleans()),
        st.tuples(st.just("release"), st.integers(0, 50)),
    ),
    min_size=12,
    max_size=60,
)
configs = st.fixed_dictionaries({
    "num_blocks": st.integers(6, 16),
    "max_num_seqs": st.integers(1, 4),
    "max_num_batched_tokens": st.integers(1, 24),
    "enable_prefix_caching": st.booleans(),
})


def reference(prompt: list[int], seed: int, n: int) -> list[int]:
    context, out = list(prompt), []
    for i in range(n):
        out.append(next_token(context, seed, i, VOCAB))
        context.append(out[-1])
    return out


def check_invariants(core: EngineCore, budget: int) -> None:
    pool: BlockPool = core.pool
    sched = core.scheduler
    pool.check_invariants()
    expected = Counter(b for r in sched.requests.values() for b in r.block_ids)
    actual = Counter({b.block_id: b.ref_count for b in pool.blocks if b.ref_count})
    assert actual == expected, "ref counts disagree with the requests' block tables"
    assert all(b.ref_count >= 0 for b in pool.blocks)
    assert pool.num_free_blocks + sum(1 for b in pool.blocks if b.ref_count) == pool.num_blocks
    assert len(sched.running) <= sched.config.max_num_seqs
    if core.runner.steps:
        assert core.runner.steps[-1].total_num_scheduled_tokens <= budget


class Driver:
    """Applies ops and plays the transfer layer for remote-KV requests."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.ids: list[str] = []
        self.meta: dict[str, tuple[list[int], int, int]] = {}  # prompt, seed, max_tokens
        self.tokens: dict[str, list[int]] = {}
        self.ended: dict[str, str | None] = {}
        self.loads: dict[str, tuple[int, ...]] = {}

    def take(self, outputs: list[EngineOutput]) -> None:
        for out in outputs:
            assert out.request_id not in self.ended, "output after the end"
            self.tokens[out.request_id].extend(out.new_token_ids)
            if out.remote_kv_load is not None and out.remote_kv_load.block_ids:
                self.loads[out.request_id] = out.remote_kv_load.block_ids
            if out.finished:
                self.ended[out.request_id] = out.finish_reason

    def apply(self, op: tuple) -> None:  # noqa: C901
        core = self.core
        kind = op[0]
        if kind == "arrive":
            _, base, length, max_tokens, mode, seed = op
            rid = f"r{len(self.ids)}"
            prompt = BASES[base][:length]
            params = SamplingParams(seed=seed, max_tokens=max_tokens)
            outputs: list[int] = []
            remote = 0
            if mode == "remote" and length > 1:
                outputs, remote = reference(prompt, seed, 1), length
            core.add_request(
                rid, prompt, params, prefill_only=mode == "prefill_only",
                output_token_ids=outputs, num_remote_tokens=remote,
            )
            self.ids.append(rid)
            self.meta[rid] = (prompt, seed, max_tokens)
            self.tokens[rid] = list(outputs)
        elif kind == "step":
            for _ in range(op[1]):
                self.take(core.step())
        elif kind == "abort" and self.ids:
            rid = self.ids[op[1] % len(self.ids)]
            if core.abort_request(rid):
                self.ended.setdefault(rid, "abort")
                self.ended[rid] = "abort"
                self.loads.pop(rid, None)
        elif kind == "kv_done" and self.loads:
            rid = sorted(self.loads)[op[1] % len(self.loads)]
            self.finish_pull(rid, op[2])
        elif kind == "release" and self.core.scheduler.held:
            rid = sorted(self.core.scheduler.held)[op[1] % len(self.core.scheduler.held)]
            assert core.release_held_blocks(rid)

    def finish_pull(self, rid: str, ok: bool) -> None:
        block_ids = self.loads.pop(rid)
        request = self.core.scheduler.requests[rid]
        if ok:  # play NIXL: write the prompt's KV into the named blocks
            bs = self.core.pool.block_size
            for pos in range(request.num_remote_tokens):
                index = pos // bs
                if request.block_ids[index] in block_ids:
                    self.core.runner.kv[request.block_ids[index]][pos % bs] = request.token_ids[pos]
        assert self.core.finish_remote_kv(rid, ok)

    def drain(self) -> None:
        for rid in list(self.core.scheduler.held):
            self.core.release_held_blocks(rid)
        for _ in range(2000):
            for rid in sorted(self.loads):
                self.finish_pull(rid, ok=True)
            if not self.core.has_unfinished_requests():
                break
            self.take(self.core.step())
            for rid in list(self.core.scheduler.held):
                self.core.release_held_blocks(rid)
        else:
            raise AssertionError("the engine did not drain")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, sequence=ops)
def test_random_workloads_keep_invariants_and_drain(config: dict, sequence: list[tuple]) -> None:
    core = make_core(max_model_len=64, **config)
    driver = Driver(core)
    budget = config["max_num_batched_tokens"]
    for op in sequence:
        try:
            driver.apply(op)
        except ValueError:  # a prompt the tiny cache cannot ever hold: refused, nothing queued
            pass
        check_invariants(core, budget)
    driver.drain()
    check_invariants(core, budget)

    assert set(driver.ended) == set(driver.ids), "some request never finished"
    for rid, reason in driver.ended.items():
        if reason == "abort":
            continue
        prompt, seed, max_tokens = driver.meta[rid]
        tokens = driver.tokens[rid]
        assert tokens == reference(prompt, seed, len(tokens)), f"{rid} diverged"
        if reason == "length" and len(tokens) < max_tokens:
            assert len(prompt) + len(tokens) >= core.pool.num_blocks * core.pool.block_size
    assert core.pool.num_used_blocks == 0
    core.check_no_leaks()
    assert not core.scheduler.requests
