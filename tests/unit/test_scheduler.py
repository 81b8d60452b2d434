"""Scheduler behaviour through EngineCore with the fake runner (no torch)."""
from __future__ import annotations

import pytest
from test_scheduler_fakes import FakeRunner, make_core, next_token, run_to_completion

from splitserve.engine.engine_core import EngineCore
from splitserve.engine.errors import EmptyPromptError, InvalidRequestError, PromptTooLongError
from splitserve.engine.request import RequestStatus
from splitserve.engine.sampling_params import SamplingParams

VOCAB = 50


def reference(prompt: list[int], seed: int, max_tokens: int, stop: frozenset[int] = frozenset()) -> list[int]:
    """What an unbatched, uncached model would generate."""
    context, out = list(prompt), []
    for i in range(max_tokens):
        token = next_token(context, seed, i, VOCAB)
        out.append(token)
        context.append(token)
        if token in stop:
            break
    return out


def params(seed: int, max_tokens: int = 6, **kw: object) -> SamplingParams:
    return SamplingParams(seed=seed, max_tokens=max_tokens, **kw)


def prompt_of(length: int, offset: int = 0) -> list[int]:
    return [(offset + 7 * i) % VOCAB for i in range(length)]


def drain_and_check(core: EngineCore) -> tuple[dict[str, list[int]], dict[str, str | None]]:
    result = run_to_completion(core)
    assert not core.scheduler.requests
    core.check_no_leaks()
    return result


def test_single_request_matches_reference() -> None:
    core = make_core()
    core.add_request("a", prompt_of(10), params(1))
    tokens, reasons = drain_and_check(core)
    assert tokens["a"] == reference(prompt_of(10), 1, 6)
    assert reasons["a"] == "length"
    stats = core.stats()
    assert stats.generation_tokens_total == 6 and stats.prompt_tokens_total == 10


def test_chunked_prefill_splits_a_prompt_over_steps() -> None:
    core = make_core(max_num_batched_tokens=5)
    core.add_request("a", prompt_of(13), params(2, max_tokens=3))
    tokens, _ = drain_and_check(core)
    steps = core.runner.steps
    assert [s.num_scheduled_tokens for s in steps[:3]] == [[5], [5], [3]]
    assert [s.samples for s in steps[:3]] == [[False], [False], [True]]
    assert all(s.total_num_scheduled_tokens <= 5 for s in steps)
    assert tokens["a"] == reference(prompt_of(13), 2, 3)


def test_decodes_go_first_and_budget_is_shared() -> None:
    core = make_core(max_num_batched_tokens=6)
    core.add_request("a", prompt_of(4), params(3, max_tokens=5))
    core.step()  # a's prompt
    core.add_request("b", prompt_of(12, 1), params(4, max_tokens=2))
    core.step()
    last = core.runner.steps[-1]
    assert [r.request_id for r in last.requests] == ["a", "b"]
    assert last.num_scheduled_tokens == [1, 5]
    tokens, _ = drain_and_check(core)


def test_without_chunking_a_prompt_waits_for_a_whole_budget() -> None:
    core = make_core(max_num_batched_tokens=10, enable_chunked_prefill=False)
    with pytest.raises(PromptTooLongError, match="chunked prefill"):
        core.add_request("long", prompt_of(11), params(1))
    core.add_request("a", prompt_of(6), params(1, max_tokens=3))
    core.add_request("b", prompt_of(6, 2), params(2, max_tokens=3))
    core.step()
    assert core.runner.steps[-1].num_scheduled_tokens == [6]  # b does not fit beside a
    tokens, _ = drain_and_check(core)
    assert tokens["b"] == reference(prompt_of(6, 2), 2, 3)


def test_max_num_seqs_caps_running() -> None:
    core = make_core(max_num_seqs=2)
    for i in range(4):
        core.add_request(f"r{i}", prompt_of(5, i), params(i, max_tokens=3))
    first = {o.request_id: o.new_token_ids for o in core.step()}
    assert core.stats().scheduler.num_running == 2 and core.stats().scheduler.num_waiting == 2
    assert sorted(first) == ["r0", "r1"]
    tokens, _ = drain_and_check(core)
    for i in range(4):
        assert first.get(f"r{i}", []) + tokens[f"r{i}"] == reference(prompt_of(5, i), i, 3)


def test_prefix_cache_hits_are_counted_and_exact() -> None:
    core = make_core()
    base = prompt_of(12)
    core.add_request("a", base, params(1))
    drain_and_check(core)
    s0 = core.stats().scheduler
    assert (s0.prefix_cache_queries, s0.prefix_cache_hits) == (12, 0)

    core.add_request("b", base + [3, 4, 5], params(2))
    drain_and_check(core)
    s1 = core.stats().scheduler
    assert s1.prefix_cache_queries == 12 + 15 and s1.prefix_cache_hits == 12
    assert core.runner.steps[-6].num_scheduled_tokens == [3]  # only the tail computed
    tokens, _ = run_to_completion(core)

    # A fully cached prompt still computes its last block for logits.
    core.add_request("c", base, params(3))
    out = core.step()
    assert out[0].num_cached_tokens == 8
    assert core.runner.steps[-1].num_scheduled_tokens == [4]
    tokens, _ = drain_and_check(core)
    assert [out[0].new_token_ids[0]] + tokens["c"] == reference(base, 3, 6)


def test_generated_tokens_fill_cached_blocks() -> None:
    core = make_core()
    prompt = prompt_of(6)
    core.add_request("a", prompt, params(1, max_tokens=7))
    tokens, _ = drain_and_check(core)
    # prompt + first 6 outputs = 12 tokens = 3 full blocks, all computed.
    follow = prompt + tokens["a"][:6] + [1]
    core.add_request("b", follow, params(2))
    out = core.step()
    assert out[0].num_cached_tokens == 12
    drain_and_check(core)


def test_salt_isolates_and_disabled_cache_never_hits() -> None:
    core = make_core()
    core.add_request("a", prompt_of(12), params(1), cache_salt="tenant-a")
    drain_and_check(core)
    core.add_request("b", prompt_of(12), params(1), cache_salt="tenant-b")
    drain_and_check(core)
    assert core.stats().scheduler.prefix_cache_hits == 0

    off = make_core(enable_prefix_caching=False)
    for rid in ("a", "b"):
        off.add_request(rid, prompt_of(12), params(1))
        drain_and_check(off)
    assert off.stats().scheduler.prefix_cache_hits == 0


def test_preemption_gives_identical_outputs() -> None:
    prompts = {f"r{i}": (prompt_of(9, i), i) for i in range(5)}

    def run(num_blocks: int) -> tuple[dict[str, list[int]], int]:
        core = make_core(num_blocks=num_blocks, max_model_len=64)
        for rid, (prompt, seed) in prompts.items():
            core.add_request(rid, prompt, params(seed, max_tokens=14))
        tokens, reasons = drain_and_check(core)
        assert set(reasons.values()) == {"length"}
        return tokens, core.stats().scheduler.num_preemptions

    roomy, roomy_preemptions = run(200)
    tight, tight_preemptions = run(12)  # 5 requests x 6 blocks each do not fit
    assert roomy_preemptions == 0 and tight_preemptions > 0
    assert tight == roomy
    assert roomy["r3"] == reference(prompt_of(9, 3), 3, 14)


def test_preemption_without_prefix_cache() -> None:
    core = make_core(num_blocks=12, enable_prefix_caching=False)
    for i in range(4):
        core.add_request(f"r{i}", prompt_of(9, i), params(i, max_tokens=14))
    tokens, _ = drain_and_check(core)
    assert core.stats().scheduler.num_preemptions > 0
    assert all(tokens[f"r{i}"] == reference(prompt_of(9, i), i, 14) for i in range(4))


def test_sequence_longer_than_the_cache_ends_with_length() -> None:
    core = make_core(num_blocks=3, max_model_len=64)  # 12 tokens of cache
    core.add_request("a", prompt_of(6), params(1, max_tokens=40))
    tokens, reasons = drain_and_check(core)
    # 12 tokens fit; the 7th output's KV would be the 13th slot.
    assert reasons["a"] == "length" and len(tokens["a"]) == 7


def test_aborts_mid_prefill_mid_decode_and_waiting() -> None:
    core = make_core(max_num_batched_tokens=8, max_num_seqs=2)
    core.add_request("decode", prompt_of(3), params(1, max_tokens=20))
    core.add_request("prefill", prompt_of(30, 1), params(2))
    core.add_request("waiting", prompt_of(5, 2), params(3))
    core.add_request("keep", prompt_of(5, 3), params(4))
    core.step()
    core.step()
    sched = core.scheduler
    prefill_req = sched.requests["prefill"]
    assert 0 < prefill_req.num_computed_tokens < prefill_req.num_prompt_tokens
    assert sched.requests["decode"].num_output_tokens >= 1
    assert core.abort_request("prefill")
    assert core.abort_request("decode")
    assert core.abort_request("waiting")
    assert not core.abort_request("waiting")  # already gone
    assert prefill_req.status == RequestStatus.FINISHED_ABORTED
    tokens, _ = drain_and_check(core)
    assert tokens["keep"] == reference(prompt_of(5, 3), 4, 6)
    assert "prefill" in core.runner.steps[-1].finished_request_ids or any(
        "prefill" in s.finished_request_ids for s in core.runner.steps
    )


def test_stop_conditions() -> None:
    prompt = prompt_of(5)
    free_run = reference(prompt, 9, 12)
    eos = free_run[2]
    first_eos = free_run.index(eos)

    core = make_core(eos_token_ids=frozenset({eos}))
    core.add_request("eos", prompt, params(9, max_tokens=12))
    core.add_request("ignore", prompt, params(9, max_tokens=12, ignore_eos=True))
    # eos sampled as output number first_eos + 1 < min_tokens does not stop.
    core.add_request("min", prompt, params(9, max_tokens=12, min_tokens=first_eos + 2))
    core.add_request("stop_id", prompt, params(9, max_tokens=12, stop_token_ids=[free_run[4]], ignore_eos=True))
    tokens, reasons = drain_and_check(core)
    assert tokens["eos"] == free_run[: first_eos + 1] and reasons["eos"] == "stop"
    assert tokens["ignore"] == free_run and reasons["ignore"] == "length"
    assert len(tokens["min"]) > first_eos + 1
    assert tokens["stop_id"] == free_run[: free_run.index(free_run[4]) + 1]

    short = make_core(max_model_len=8)
    short.add_request("a", prompt, params(9, max_tokens=None))
    tokens, reasons = drain_and_check(short)
    assert len(prompt) + len(tokens["a"]) == 8 and reasons["a"] == "length"


def test_bad_input_is_refused_before_queueing() -> None:
    core = make_core(max_model_len=16)
    core.add_request("ok", prompt_of(4), params(1))
    cases = [
        (PromptTooLongError, "max_model_len", dict(request_id="long", prompt_token_ids=prompt_of(16))),
        (EmptyPromptError, "empty", dict(request_id="empty", prompt_token_ids=[])),
        (InvalidRequestError, "already in use", dict(request_id="ok", prompt_token_ids=[1])),
        (InvalidRequestError, "vocabulary", dict(request_id="vocab", prompt_token_ids=[1, VOCAB])),
        (InvalidRequestError, "vocabulary", dict(request_id="neg", prompt_token_ids=[-1])),
        (InvalidRequestError, "n=2", dict(request_id="n", prompt_token_ids=[1], sampling_params=SamplingParams(n=2))),
        (InvalidRequestError, "num_remote_tokens", dict(request_id="r", prompt_token_ids=[1], num_remote_tokens=1)),
    ]
    for error, match, kwargs in cases:
        with pytest.raises(error, match=match):
            core.add_request(**kwargs)  # type: ignore[arg-type]
    assert list(core.scheduler.requests) == ["ok"]
    tokens, _ = drain_and_check(core)
    assert tokens["ok"] == reference(prompt_of(4), 1, 6)

    tiny = make_core(num_blocks=2)  # 8 tokens of cache
    with pytest.raises(PromptTooLongError, match="whole cache"):
        tiny.add_request("big", prompt_of(8), params(1))
    tiny.check_no_leaks()


def test_prefill_only_holds_blocks_until_released() -> None:
    core = make_core()
    prompt = prompt_of(10)
    core.add_request("p", prompt, params(5), prefill_only=True)
    (out,) = core.step()
    assert out.finished and out.finish_reason is None
    assert out.new_token_ids == reference(prompt, 5, 1)
    assert out.held_block_ids is not None and len(out.held_block_ids) == 3
    assert out.num_held_tokens == 10
    assert not core.has_unfinished_requests()
    assert core.stats().scheduler.num_held == 1 and core.stats().scheduler.num_held_blocks == 3
    assert core.pool.num_used_blocks == 3
    assert core.release_held_blocks("p")
    assert not core.release_held_blocks("p")
    core.check_no_leaks()
    # The released blocks stay cached.
    core.add_request("again", prompt, params(5))
    assert core.step()[0].num_cached_tokens == 8
    drain_and_check(core)

    # Abort releases held blocks too; a first token that ends the request holds nothing.
    core.add_request("q", prompt, params(5), prefill_only=True)
    core.step()
    assert core.abort_request("q")
    core.add_request("one", prompt, params(5, max_tokens=1), prefill_only=True)
    (out,) = core.step()
    assert out.finished and out.finish_reason == "length" and out.held_block_ids is None
    drain_and_check(core)


def disaggregated(decoder: EngineCore, prompt: list[int], seed: int, rid: str = "d"):  # noqa: ANN201
    """Prefill on a fresh engine, then queue the continuation on ``decoder``."""
    prefill = make_core()
    prefill.add_request(rid, prompt, params(seed, max_tokens=8), prefill_only=True)
    (first,) = prefill.step()
    decoder.add_request(
        rid, prompt, params(seed, max_tokens=8), output_token_ids=first.new_token_ids,
        num_remote_tokens=first.num_held_tokens,
    )
    return prefill, first


def test_remote_kv_wait_success_and_local_hits() -> None:
    decoder = make_core()
    prompt = prompt_of(14)
    # The decoder already holds the first 8 tokens' blocks from another request.
    decoder.add_request("warm", prompt[:9], params(1, max_tokens=1))
    drain_and_check(decoder)

    prefill, first = disaggregated(decoder, prompt, seed=7)
    decoder.add_request("other", prompt_of(5, 3), params(2, max_tokens=4))
    outs = decoder.step()
    other_tokens = [t for o in outs if o.request_id == "other" for t in o.new_token_ids]
    load = next(o.remote_kv_load for o in outs if o.remote_kv_load is not None)
    assert load.num_local_hit_tokens == 8 and load.remote_block_indices == (2, 3)
    stats = decoder.stats().scheduler
    assert stats.num_waiting_for_remote_kv == 1 and stats.num_running == 1
    for _ in range(3):  # the parked request never blocks others
        other_tokens += [t for o in decoder.step() for t in o.new_token_ids]
    assert decoder.scheduler.requests["d"].status == RequestStatus.WAITING_FOR_REMOTE_KV
    src = [first.held_block_ids[i] for i in load.remote_block_indices]
    decoder.runner.copy_blocks_from(prefill.runner, src, list(load.block_ids))
    assert decoder.finish_remote_kv("d", ok=True)
    assert not decoder.finish_remote_kv("d", ok=True)
    assert prefill.release_held_blocks("d")
    prefill.check_no_leaks()
    tokens, _ = drain_and_check(decoder)
    assert first.new_token_ids + tokens["d"] == reference(prompt, 7, 8)
    assert other_tokens == reference(prompt_of(5, 3), 2, 4)


def test_remote_kv_failure_falls_back_to_recompute() -> None:
    decoder = make_core()
    prompt = prompt_of(14)
    prefill, first = disaggregated(decoder, prompt, seed=7)
    (notice,) = decoder.step()
    assert notice.remote_kv_load is not None and notice.remote_kv_load.num_local_hit_tokens == 0
    assert decoder.finish_remote_kv("d", ok=False)  # nothing was copied
    prefill.release_held_blocks("d")
    tokens, _ = drain_and_check(decoder)
    assert first.new_token_ids + tokens["d"] == reference(prompt, 7, 8)


def test_remote_kv_all_local_needs_no_pull_and_abort_while_waiting() -> None:
    decoder = make_core()
    prompt = prompt_of(12)
    decoder.add_request("warm", prompt + [1], params(1, max_tokens=1))
    drain_and_check(decoder)
    _, first = disaggregated(decoder, prompt, seed=3)
    notice, sampled = decoder.step()  # no pull: it runs in the same step
    assert notice.remote_kv_load.block_ids == () and notice.remote_kv_load.num_local_hit_tokens == 12
    assert decoder.stats().scheduler.num_waiting_for_remote_kv == 0
    tokens, _ = drain_and_check(decoder)
    assert first.new_token_ids + sampled.new_token_ids + tokens["d"] == reference(prompt, 3, 8)

    _, first = disaggregated(decoder, prompt_of(12, 5), seed=3, rid="x")
    decoder.step()
    assert decoder.stats().scheduler.num_waiting_for_remote_kv == 1
    assert decoder.abort_request("x")
    assert not decoder.finish_remote_kv("x", ok=True)
    drain_and_check(decoder)


def test_runner_contract_violation_is_reported() -> None:
    core = EngineCore(make_core().engine_args, FakeRunner())

    class Silent(FakeRunner):
        def execute(self, so):  # noqa: ANN001, ANN202
            return super().execute(so).__class__()

    core = EngineCore(core.engine_args, Silent())
    core.add_request("a", prompt_of(3), params(1))
    with pytest.raises(RuntimeError, match="no token"):
        core.step()
    core.abort_request("a")
    core.check_no_leaks()
