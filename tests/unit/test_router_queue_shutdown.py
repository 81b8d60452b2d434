"""The router process's life in-process (``serve``): file discovery feeding
it while it runs, and SIGTERM: new requests and /health 503 with
Retry-After, open streams finish within --shutdown-grace-seconds, what is
left after it is cut (and aborted on the pod), then ``serve`` returns.
Pods are fake Engine servers (test doubles)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from test_router_membership_fakes import add_pod, free_port, no_leaks, until
from test_router_orchestrator_fakes import BLOCK, FakeCluster

from splitserve.engine.tiny_model import write_tokenizer
from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.router.discovery import DiscoveryConfig
from splitserve.router.server import RouterConfig, serve

pytestmark = pytest.mark.asyncio

BODY = {"model": "tiny", "prompt": "a long answer, please", "temperature": 0, "stream": True}


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[FakeCluster]:
    c = FakeCluster()
    yield c
    await c.stop()


def write_pods(path: Path, *pods: tuple[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": 1, "pods": [
        {"role": role, "address": address, "state": "ready"} for role, address in pods]}))
    os.replace(tmp, path)


async def start_router(tmp_path: Path, pods_file: Path, grace_s: float) -> tuple[asyncio.Task, str, asyncio.Event]:
    model = tmp_path / "model"
    model.mkdir()
    write_tokenizer(model)
    port = free_port()
    config = RouterConfig(model=str(model), served_model_names=("tiny",), port=port, block_size=BLOCK,
                          pd_threshold_tokens=16, poll_interval_s=0.02, shutdown_grace_s=grace_s,
                          discovery=DiscoveryConfig("file", file=str(pods_file), file_poll_s=0.02))
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop))
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        for _ in range(1000):
            if task.done():
                task.result()
            try:
                if (await client.post("/v1/completions", json={**BODY, "stream": False, "max_tokens": 1})
                        ).status_code == 200:
                    return task, url, stop
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.02)
    raise AssertionError("the router never served")


async def test_sigterm_refuses_new_work_lets_open_streams_finish_and_returns(
        tmp_path: Path, cluster: FakeCluster) -> None:
    p = await add_pod(cluster, "p0", pb.ROLE_PREFILL)
    d0 = await add_pod(cluster, "d0", pb.ROLE_DECODE)
    d0.token_delay_s = 0.03
    pods = tmp_path / "pods.json"
    write_pods(pods, ("prefill", p.address), ("decode", d0.address))
    task, url, _ = await start_router(tmp_path, pods, grace_s=30)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        # the pod set changes while it serves: d1 joins through the file
        d1 = await add_pod(cluster, "d1", pb.ROLE_DECODE)
        write_pods(pods, ("prefill", p.address), ("decode", d0.address), ("decode", d1.address))
        metrics = lambda: client.get("/metrics")  # noqa: E731
        for _ in range(500):
            if 'splitserve:router_pods{pool="decode",state="ready"} 2.0' in (await metrics()).text:
                break
            await asyncio.sleep(0.02)
        assert 'splitserve:router_pods{pool="decode",state="ready"} 2.0' in (await metrics()).text
        d1.token_delay_s = 0.03
        async with client.stream("POST", "/v1/completions", json={**BODY, "max_tokens": 30}) as stream:
            lines = stream.aiter_lines()
            first = await anext(lines)
            assert first.startswith("data: ")
            os.kill(os.getpid(), signal.SIGTERM)  # the router's handler takes it
            for _ in range(500):
                if (await client.get("/health")).status_code == 503:
                    break
                await asyncio.sleep(0.01)
            assert (await client.get("/health")).status_code == 503
            refused = await client.post("/v1/completions", json={**BODY, "stream": False, "max_tokens": 2})
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            assert "shutting down" in refused.json()["error"]["message"]
            rest = [line async for line in lines]
        assert [line for line in rest if line][-1] == "data: [DONE]"
        body = [json.loads(line[6:]) for line in [first, *rest] if line.startswith("data: {")]
        assert body[-1]["choices"][0]["finish_reason"] == "length"
        assert not any("error" in event for event in body)
    await asyncio.wait_for(task, 30)  # serve returned: the process would exit 0
    assert task.exception() is None
    await no_leaks(p, d0, d1)


async def test_streams_past_the_grace_period_are_cut_and_aborted_on_the_pod(
        tmp_path: Path, cluster: FakeCluster) -> None:
    p = await add_pod(cluster, "p0", pb.ROLE_PREFILL)
    d = await add_pod(cluster, "d0", pb.ROLE_DECODE)
    pods = tmp_path / "pods.json"
    write_pods(pods, ("prefill", p.address), ("decode", d.address))
    task, url, stop = await start_router(tmp_path, pods, grace_s=0.3)
    d.token_delay_s = 0.05
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        endless = asyncio.create_task(client.post("/v1/completions", json={**BODY, "max_tokens": 4000}))
        await until(lambda: bool(d.running), "the long stream runs")
        stop.set()
        await asyncio.wait_for(task, 30)
        assert task.exception() is None
        await asyncio.gather(endless, return_exceptions=True)
    await until(lambda: bool(d.cancelled), "the pod saw its stream cancelled")
    await no_leaks(p, d)
