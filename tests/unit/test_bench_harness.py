"""The benchmark harness's own logic: workloads, result parsing, process stopping.

vLLM itself never runs here (it lives in its own venv and takes a minute to
start); these tests use plain ``sleep`` children.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers.procs import group_members, start_process_group, stop_process_group  # noqa: E402
from bench.peers.vllm_offline import cpu_bind_for_threads  # noqa: E402
from bench.peers.vllm_runner import (  # noqa: E402
    RESULT_SCHEMA,
    format_table,
    parse_offline_result,
    peer_env,
)
from bench.peers.vllm_server import VllmServerConfig, server_argv  # noqa: E402
from bench.workload import (  # noqa: E402
    FIRST_ORDINARY_TOKEN_ID,
    EngineWorkload,
    ServingWorkload,
    engine_workload,
    serving_workload,
)


def test_engine_workload_full_matches_spec() -> None:
    wl = engine_workload(32000, seed=0)
    assert len(wl.requests) == 64
    assert wl.temperature == 0.0 and wl.ignore_eos
    assert all(r.max_tokens == 128 for r in wl.requests)
    lengths = [len(r.prompt_token_ids) for r in wl.requests]
    assert min(lengths) >= 32 and max(lengths) <= 512
    assert len(set(lengths)) > 16  # spread, not constant
    assert all(FIRST_ORDINARY_TOKEN_ID <= t < 32000 for r in wl.requests for t in r.prompt_token_ids)
    assert len({r.request_id for r in wl.requests}) == 64


def test_engine_workload_is_deterministic_and_seeded() -> None:
    assert engine_workload(32000, seed=3) == engine_workload(32000, seed=3)
    assert engine_workload(32000, seed=3) != engine_workload(32000, seed=4)
    quick = engine_workload(32000, quick=True)
    assert len(quick.requests) < 64 and quick.max_tokens < 128
    assert engine_workload(100, num_requests=2, max_tokens=5).num_output_tokens == 10


def test_engine_workload_json_roundtrip() -> None:
    wl = engine_workload(1000, quick=True, seed=1)
    data = json.loads(json.dumps(wl.to_dict()))
    assert EngineWorkload.from_dict(data) == wl
    with pytest.raises(ValueError, match="not an engine workload"):
        EngineWorkload.from_dict({"schema": "other"})


def test_engine_workload_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        engine_workload(8)
    with pytest.raises(ValueError):
        engine_workload(1000, min_prompt_len=10, max_prompt_len=5)


def test_serving_workload_shape_and_determinism() -> None:
    wl = serving_workload(2.0, 200, seed=7)
    assert wl == serving_workload(2.0, 200, seed=7)
    assert wl != serving_workload(2.0, 200, seed=8)
    arrivals = [r.arrival_s for r in wl.requests]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    # Poisson at 2 rps: mean gap ~0.5 s.
    mean_gap = arrivals[-1] / (len(arrivals) - 1)
    assert 0.35 < mean_gap < 0.7
    kinds = [r.kind for r in wl.requests]
    assert 0 < kinds.count("document") < 50
    chats = [r for r in wl.requests if r.kind == "chat"]
    system = chats[0].messages[0]
    assert system.role == "system" and len(system.content.split()) == 512
    assert all(r.messages[0] == system for r in chats)
    docs = [r for r in wl.requests if r.kind == "document"]
    assert all(r.prompt_words >= 1024 for r in docs)
    # Later turns of a conversation extend earlier ones (shared prefixes).
    by_conv: dict[int, list[int]] = {}
    for r in chats:
        by_conv.setdefault(r.conversation, []).append(r.turn)
        if r.turn > 0:
            assert r.messages[-1].role == "user" and r.messages[-2].role == "assistant"
    assert all(turns == list(range(len(turns))) for turns in by_conv.values())


def test_serving_workload_json_roundtrip() -> None:
    wl = serving_workload(1.0, 20, seed=1)
    assert ServingWorkload.from_dict(json.loads(json.dumps(wl.to_dict()))) == wl


def _fake_result(latencies: list[float] | None) -> dict[str, object]:
    batch = {"elapsed_s": 2.0, "output_tokens": 256, "output_tok_s": 128.0, "latencies_s": latencies}
    return {
        "schema": RESULT_SCHEMA, "vllm_version": "0.0.test", "model": "/m", "dtype": "float32",
        "threads": 2, "cpu_bind": "0-1", "enforce_eager": False, "workload": "engine-quick",
        "num_requests": 2, "prompt_tokens": 100, "startup_s": 50.0, "cold": batch, "warm": batch,
        "single_request_latency_s": 1.5, "peak_rss_bytes": 3 * 2**30, "self_max_rss_bytes": 1,
        "output_token_ids": [[1, 2, 3], [4, 5]],
    }


def test_parse_offline_result() -> None:
    r = parse_offline_result(json.loads(json.dumps(_fake_result([1.0, 2.0, 3.0, 4.0]))))
    assert r.warm.output_tok_s == 128.0 and r.startup_s == 50.0
    assert r.output_token_ids == ((1, 2, 3), (4, 5))
    assert r.warm.latency_p50_s == pytest.approx(2.5)
    assert r.warm.latency_p99_s is not None and 3.9 < r.warm.latency_p99_s <= 4.0
    assert "output_token_ids" not in r.summary()
    assert "vllm 0.0.test" in format_table([r])
    assert parse_offline_result(_fake_result(None)).cold.latency_p50_s is None


def test_parse_offline_result_rejects_other_json() -> None:
    with pytest.raises(ValueError, match="not a vLLM offline result"):
        parse_offline_result({"schema": "x"})
    bad = _fake_result(None)
    del bad["warm"]
    with pytest.raises(ValueError, match="lacks field"):
        parse_offline_result(bad)


def test_thread_binding_and_env(tmp_path: Path) -> None:
    assert cpu_bind_for_threads(1) == "0"
    assert cpu_bind_for_threads(2) == "0-1"
    with pytest.raises(ValueError):
        cpu_bind_for_threads(0)
    env = peer_env(tmp_path, threads=2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    for key in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "VLLM_RPC_BASE_PATH"):
        assert env[key].startswith(str(tmp_path))
    assert (tmp_path / "rpc").is_dir()
    assert "VIRTUAL_ENV" not in env


def test_server_argv() -> None:
    cfg = VllmServerConfig(model_dir=Path("/m"), port=1234, kv_transfer_config={"kv_connector": "NixlConnector"})
    argv = server_argv(Path("/venv/bin/python"), cfg)
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--port") + 1] == "1234"
    assert json.loads(argv[argv.index("--kv-transfer-config") + 1]) == {"kv_connector": "NixlConnector"}


def test_stop_process_group_kills_child_and_grandchild() -> None:
    # A shell that starts a grandchild `sleep` and ignores SIGTERM itself, so
    # the SIGKILL escalation path is exercised too.
    proc = start_process_group(["sh", "-c", "trap '' TERM; sleep 300 & sleep 300; wait"])
    try:
        deadline = time.monotonic() + 5
        while len(group_members(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = group_members(proc.pid)
        assert proc.pid in members and len(members) >= 3
    finally:
        stop_process_group(proc, term_timeout_s=1.0)
    assert proc.returncode is not None
    assert group_members(proc.pid) == []
    # `ps` agrees (zombies awaiting init's reaping are dead already).
    ps = subprocess.run(["ps", "-o", "stat=", "-g", str(proc.pid)], capture_output=True, text=True)
    assert [s for s in ps.stdout.split() if not s.startswith("Z")] == []


def test_stop_process_group_is_quick_for_a_polite_child() -> None:
    proc = start_process_group(["sleep", "300"])
    start = time.monotonic()
    stop_process_group(proc)
    assert time.monotonic() - start < 5
    assert group_members(proc.pid) == []


def test_token_agreement() -> None:
    from bench.peers.agreement import token_agreement

    same = token_agreement([[1, 2, 3], [4]], [[1, 2, 3], [4]])
    assert same.all_exact and same.prefix_fraction == 1.0 and same.first_mismatch is None
    diff = token_agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 9], [5, 6]])
    assert diff.exact == 1 and diff.first_mismatch == 0
    assert diff.prefix_fraction == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="same workload"):
        token_agreement([[1]], [])
