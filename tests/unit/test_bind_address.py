"""Pods and the router bind only the addresses their --host flag names
(default 127.0.0.1), never every interface unless told: a process bound to
127.0.0.2 answers there and refuses 127.0.0.3 (both loopback on Linux, so a
0.0.0.0 bind would answer both). Real processes in-process: a unified pod on
the tiny model, the router with an empty pod list."""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
from pathlib import Path

import grpc
import httpx
import pytest
from test_router_membership_fakes import free_port

from splitserve.cli import serve_command, router_command
from splitserve.engine.engine_args import EngineArgs
from splitserve.engine.tiny_model import write_tokenizer
from splitserve.pod.config import PodConfig
from splitserve.pod.messages import Role
from splitserve.pod.server import PodServer
from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc
from splitserve.router.discovery import DiscoveryConfig
from splitserve.router.server import RouterConfig, serve

pytestmark = pytest.mark.timeout(180)
BOUND, OTHER = "127.0.0.2", "127.0.0.3"


def _refused(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) != 0


def _parse(register, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_defaults_are_loopback() -> None:
    assert PodConfig(Role.PREFILL).host == "127.0.0.1"
    assert RouterConfig(model="m", unified=("u:1",)).hosts == ("127.0.0.1",)
    assert _parse(serve_command.register, ["serve", "decode"]).host == "127.0.0.1"
    assert _parse(router_command.register, ["router", "--model", "m"]).host == "127.0.0.1"
    assert RouterConfig(model="m", unified=("u:1",), host="10.1.2.3, 127.0.0.1").hosts == ("10.1.2.3", "127.0.0.1")
    with pytest.raises(ValueError, match="--host"):
        RouterConfig(model="m", unified=("u:1",), host=" , ")


@pytest.mark.asyncio
async def test_router_binds_each_listed_address_and_no_other(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    write_tokenizer(model)
    pods = tmp_path / "pods.json"
    pods.write_text(json.dumps({"version": 1, "pods": []}))
    port, scaler_port = free_port(), free_port()
    config = RouterConfig(model=str(model), host=f"127.0.0.1,{BOUND}", port=port, scaler_port=scaler_port,
                          discovery=DiscoveryConfig("file", file=str(pods)), shutdown_grace_s=0)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop))
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            for _ in range(500):
                assert not task.done(), task
                try:
                    await client.get(f"http://{BOUND}:{port}/health")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.02)
            for host in ("127.0.0.1", BOUND):
                assert (await client.get(f"http://{host}:{port}/metrics")).status_code == 200
                assert not _refused(host, scaler_port)
        assert _refused(OTHER, port) and _refused(OTHER, scaler_port)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.mark.asyncio
async def test_pod_binds_its_host_only(tiny_checkpoints: dict) -> None:
    grpc_port, http_port = free_port(), free_port()
    config = PodConfig(Role.UNIFIED, host=BOUND, port=grpc_port, http_port=http_port, shutdown_grace_seconds=0)
    engine = EngineArgs(model=str(tiny_checkpoints["llama"]), device="cpu", block_size=8, max_model_len=128,
                        attention_backend="torch", num_gpu_blocks_override=16)
    server = PodServer(config, engine)
    task = asyncio.create_task(server.run())
    try:
        for _ in range(3000):
            assert not task.done(), task
            if server.status == "ok":
                break
            await asyncio.sleep(0.02)
        async with grpc.aio.insecure_channel(f"{BOUND}:{grpc_port}") as channel:
            load = await pb_grpc.EngineStub(channel).GetLoad(pb.GetLoadRequest(), timeout=5)
            assert load.role == pb.ROLE_UNIFIED
        async with httpx.AsyncClient(timeout=2) as client:
            assert (await client.get(f"http://{BOUND}:{http_port}/health")).status_code == 200
        for port in (grpc_port, http_port):
            assert _refused(OTHER, port) and _refused("127.0.0.1", port)
    finally:
        server.request_stop()
        assert await asyncio.wait_for(task, 60) == 0
