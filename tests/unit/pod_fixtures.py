"""Two or three pod cores in one process: real tiny engines, FakeTransports on
one FakeFabric, decode pods reaching prefill pods through a LocalPeerClient."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from splitserve.decode.peer_client import LocalPeerClient
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.engine_args import EngineArgs
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kvtransfer import FakeFabric, FakeTransport
from splitserve.pod.config import PodConfig
from splitserve.pod.core import PodCore
from splitserve.pod.kv_event_hub import KVEventHub
from splitserve.pod.messages import DecodeChunk, DecodeFinished, Role
from splitserve.pod.servicer import PodServicer
from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc

ENGINE = dict(device="cpu", block_size=8, max_model_len=128, attention_backend="torch", num_gpu_blocks_override=48)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@dataclass
class Cluster:
    model: Path
    fabric: FakeFabric = field(default_factory=FakeFabric)
    pods: dict[str, PodCore] = field(default_factory=dict)

    async def pod(self, role: Role, address: str, *, fingerprint: str = "m", engine: dict | None = None,
                  **config: object) -> PodCore:
        kv_events = KVEventHub()
        eng = AsyncEngine.from_engine_args(EngineArgs(model=str(self.model), **{**ENGINE, **(engine or {})}),
                                           after_step=[kv_events.after_step])
        cfg = PodConfig(role, advertise_address=address, **config)  # type: ignore[arg-type]
        transport = None
        if role is not Role.UNIFIED:
            transport = FakeTransport(self.fabric, cfg.transfer_agent_name, eng.core.runner.kv_cache,
                                      model_fingerprint=fingerprint, default_timeout_s=cfg.kv_transfer_timeout_s)
        client = LocalPeerClient(self.pods.get) if role is Role.DECODE else None
        core = PodCore(cfg, eng, transport, client, kv_events)
        await core.start()
        self.pods[address] = core
        return core

    async def close(self) -> None:
        for core in self.pods.values():
            await core.close()


@contextlib.asynccontextmanager
async def grpc_pods(cluster: Cluster, roles: tuple[Role, ...] = (Role.PREFILL, Role.DECODE),
                    credentials: grpc.ServerCredentials | None = None,
                    **config: object) -> AsyncIterator[dict[Role, tuple[int, PodCore]]]:
    """One pod core per role behind a real grpc.aio server on 127.0.0.1
    (TLS when ``credentials``); yields role -> (port, core); stops them after."""
    servers, out = [], {}
    try:
        for role in roles:
            server = grpc.aio.server()
            address = "127.0.0.1:0"
            port = (server.add_secure_port(address, credentials) if credentials is not None
                    else server.add_insecure_port(address))
            core = await cluster.pod(role, f"127.0.0.1:{port}", **config)
            pb_grpc.add_EngineServicer_to_server(PodServicer(core), server)
            await server.start()
            servers.append(server)
            out[role] = (port, core)
        yield out
    finally:
        for server in servers:
            await server.stop(0)


async def collect(core: PodCore, request_id: str, tokens: list[int], params: SamplingParams = GREEDY,
                  **kwargs: object) -> tuple[list[int], DecodeFinished]:
    out: list[int] = []
    finished = None
    num_prompt_tokens = int(kwargs.pop("num_prompt_tokens", 0))  # type: ignore[call-overload]
    async for event in core.decode(request_id, tokens, num_prompt_tokens, params, **kwargs):  # type: ignore[arg-type]
        if isinstance(event, DecodeChunk):
            out += event.token_ids
        else:
            finished = event
    assert finished is not None
    return out, finished


async def disaggregated(prefill: PodCore, decode: PodCore, request_id: str, prompt: list[int],
                        params: SamplingParams = GREEDY) -> tuple[list[int], DecodeFinished]:
    result = await prefill.prefill(request_id, prompt, params)
    assert result.kv_handle is not None
    rest, finished = await collect(decode, request_id, prompt + [result.first_token_id], params,
                                   num_prompt_tokens=len(prompt), kv_handle=result.kv_handle)
    return [result.first_token_id] + rest, finished


async def wait_clean(*cores: PodCore, timeout: float = 5.0) -> None:
    """Every pod back to zero used and zero leased blocks (or fail)."""
    deadline = time.monotonic() + timeout
    while True:
        loads = [c.load() for c in cores]
        if all(ld.num_free_blocks == ld.num_total_blocks and ld.num_leased_blocks == 0 for ld in loads):
            return
        assert time.monotonic() < deadline, f"blocks still used or leased: {loads}"
        await asyncio.sleep(0.02)
