"""A 16-pod simulated fleet (8 prefill + 8 decode sim pods in one process,
``splitserve serve sim``) behind the real router (``splitserve router``):
kv_affinity reuses more prefix cache than round_robin on the same
multi-tenant workload, and a churn step (pods drained away and added while
requests stream) loses no request. Every request must finish with exactly
its tokens (the simulated model's, so failovers are checked token by
token), and the test ends by checking that no sim pod holds a request, a
block or a lease. Sim pods are test doubles of engine pods (the real pod
code with a latency model in place of the model); timing is never asserted.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from splitserve.engine.sim_runner import sim_tokens
from splitserve.sim.fleet_control import FleetControl
from splitserve.sim.fleet_launch import (FleetSpec, Proc, RouterSpec, free_port, router_supports_file_discovery,
                                         start_fleet, start_router, wait_router_pods)
from splitserve.sim.fleet_report import hit_rates
from splitserve.sim.replay_client import replay_sessions
from splitserve.sim.workload import Turn, WorkloadSpec, build_sessions

pytestmark = [pytest.mark.integration, pytest.mark.asyncio, pytest.mark.timeout(300)]

NUM_PREFILL = NUM_DECODE = 8
# 24 tenants x ~32 blocks of system prompt against 8 prefill pods of 256
# blocks: one pod holds about 8 tenants, so spreading every tenant over all
# pods (round robin) evicts what pinning tenants to pods (affinity) keeps.
WORKLOAD = WorkloadSpec(num_tenants=24, system_tokens=(256, 768), zipf_s=1.0, sessions_per_s=6.0, duration_s=5.0,
                        turns=(1, 3), user_tokens=(16, 64), reply_tokens=(16, 32), max_tokens=(2, 5),
                        think_s=0.3, seed=3)
FLEET_ARGS = ("--num-gpu-blocks-override", "256", "--prefill-per-token-ms", "0.02", "--prefill-overhead-ms", "2",
              "--decode-base-ms", "4", "--decode-per-seq-ms", "0.1", "--kv-lease-seconds", "10")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from splitserve.engine.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("fleet-logs")
    use_file = router_supports_file_discovery()
    discovery = str(logs / "pods.json") if use_file else None
    spec = FleetSpec(NUM_PREFILL, NUM_DECODE, base_port=0, http_port=free_port(), num_blocks=256,
                     extra_args=FLEET_ARGS, discovery_file=discovery)
    proc = start_fleet(spec, logs)
    yield proc, spec, logs
    assert proc.stop(60.0) == 0, proc.tail()


def _expected(tokenizer):
    def expected(turn: Turn) -> list[str]:
        return [tokenizer.decode([t]) for t in sim_tokens(turn.prompt, turn.max_tokens, len(tokenizer))]
    return expected


async def _routers(fleet: tuple, control: FleetControl, model_dir: Path,
                   policies: dict[str, str]) -> dict[str, tuple[Proc, str]]:
    """Routers (name -> policy) over every pod of the fleet, started side by
    side: file discovery when the router has it, else the static address
    lists. Each is used alone; the idle ones only poll."""
    _proc, spec, logs = fleet
    pods = await control.pods()

    def start(name: str, policy: str) -> tuple[Proc, str]:
        router = RouterSpec(str(model_dir), free_port(), policy, discovery_file=spec.discovery_file,
                            prefill=tuple(p["address"] for p in pods if p["role"] == "prefill"),
                            decode=tuple(p["address"] for p in pods if p["role"] == "decode"), poll_interval_s=0.5)
        return start_router(router, logs, name), f"http://127.0.0.1:{router.port}"

    started = await asyncio.gather(*(asyncio.to_thread(start, n, p) for n, p in policies.items()),
                                   return_exceptions=True)
    routers = {n: r for n, r in zip(policies, started) if not isinstance(r, BaseException)}
    errors = [r for r in started if isinstance(r, BaseException)]
    if errors:
        for proc, _url in routers.values():
            proc.stop(10.0)
        raise errors[0]
    return routers


async def _ready(control: FleetControl, url: str) -> None:
    """Until the router counts every serving pod ready (and has seen restarts)."""
    serving = sum(p["status"] == "ready" for p in await control.pods())
    await asyncio.sleep(1.0)  # two polls: restarted pods' new incarnations are noticed
    await asyncio.to_thread(wait_router_pods, int(url.rsplit(":", 1)[1]), serving, 30.0)


def _check_all_exact(results: list) -> None:
    lost = [r for r in results if not r.ok]
    assert not lost, f"{len(lost)} lost request(s), first: {lost[0].error}"
    wrong = [r for r in results if r.exact is False]
    assert not wrong, f"{len(wrong)} request(s) with wrong tokens (session {wrong[0].session_id})"


async def test_kv_affinity_beats_round_robin_then_churn_loses_nothing(fleet, model_dir: Path) -> None:
    from splitserve.engine.tokenizer import load_tokenizer

    proc, spec, _logs = fleet
    control = FleetControl(f"http://127.0.0.1:{spec.http_port}")
    expected = _expected(load_tokenizer(model_dir))
    sessions = build_sessions(WORKLOAD)
    pods = await control.pods()
    victims = [next(p["name"] for p in pods if p["role"] == role) for role in ("decode", "prefill")]
    spares = [next(p["name"] for p in reversed(pods) if p["role"] == role) for role in ("decode", "prefill")]
    routers = await _routers(fleet, control, model_dir, {"kv_affinity": "kv_affinity", "round_robin": "round_robin",
                                                         "churn": "kv_affinity"})
    rates = {}
    try:
        for policy in ("kv_affinity", "round_robin"):
            await control.restart()  # cold caches, fresh observations
            await _ready(control, routers[policy][1])
            results, _wall = await replay_sessions(sessions, [routers[policy][1]], str(model_dir), expected=expected)
            _check_all_exact(results)
            rates[policy] = hit_rates(await control.oracle())
        assert rates["kv_affinity"]["hit_rate"] > rates["round_robin"]["hit_rate"], rates

        # Churn step: while requests stream, one decode and one prefill pod are
        # drained away (grace 0.5 s: streams still running then move to another
        # decode pod) and one pod of each role joins: new pods through the
        # discovery file, or (static discovery) listed pods that were down.
        await control.restart()
        if not spec.discovery_file:
            await asyncio.gather(*(control.stop_pod(name, grace_seconds=0.0) for name in spares))
        url = routers["churn"][1]
        await _ready(control, url)
        churn = WorkloadSpec(**{**WORKLOAD.__dict__, "duration_s": 6.0, "seed": 4, "max_tokens": (6, 12)})
        replay = asyncio.create_task(replay_sessions(build_sessions(churn), [url], str(model_dir), expected=expected))
        await asyncio.sleep(2.0)
        if spec.discovery_file:
            joins = [control.add_pod(role) for role in ("decode", "prefill")]
            leaves = [control.remove_pod(name, grace_seconds=0.5) for name in victims]
        else:
            joins = [control.start_pod(name) for name in spares]
            leaves = [control.stop_pod(name, grace_seconds=0.5) for name in victims]
        await asyncio.gather(*joins, *leaves)
        results, _wall = await replay
        _check_all_exact(results)
        assert len(results) > 20
        held = await control.wait_idle(30.0)
        assert held["idle"], held
        assert proc.popen.poll() is None
    finally:
        for router, _url in routers.values():
            assert router.stop(30.0) == 0, router.tail()
        await control.aclose()
