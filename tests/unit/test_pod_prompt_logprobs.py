"""Prompt logprobs through the control plane: real tiny engines behind real
gRPC pods, called with the router's ``PodClient``. The pod that samples
token 0 computes them (a prefill pod's Prefill, a unified or decode pod's
Decode without a handle) and they are the same everywhere; a Decode that
continues from a prefill pod's KV sends none, so the router gets them once."""
from __future__ import annotations

import pytest
import pytest_asyncio
import torch

from pod_fixtures import Cluster, grpc_pods, wait_clean
from splitserve.engine.sampling_params import SamplingParams
from splitserve.pod.messages import Role
from splitserve.router.pd_client import DecodeChunk, PodClient

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

PARAMS = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)


@pytest_asyncio.fixture
async def cluster(tiny_checkpoints: dict):
    c = Cluster(tiny_checkpoints["llama"])
    yield c
    await c.close()


async def _decode(client: PodClient, rid: str, tokens: tuple[int, ...], n_prompt: int,
                  handle: object = None) -> list[DecodeChunk]:
    return [e async for e in client.decode(rid, tokens, n_prompt, PARAMS, handle)  # type: ignore[arg-type]
            if isinstance(e, DecodeChunk)]


def _same(a: tuple, b: tuple) -> None:
    assert a[0] is None and b[0] is None and len(a) == len(b)
    for x, y in zip(a[1:], b[1:]):
        assert (x.token_id, x.rank, x.top_token_ids) == (y.token_id, y.rank, y.top_token_ids)
        assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
        assert x.top_logprobs == pytest.approx(y.top_logprobs, abs=1e-5)


async def test_prompt_logprobs_come_once_from_whoever_computes_the_prompt(cluster: Cluster) -> None:
    prompt = tuple(torch.randint(0, 288, (21,), generator=torch.Generator().manual_seed(5)).tolist())
    async with grpc_pods(cluster, (Role.PREFILL, Role.DECODE, Role.UNIFIED)) as pods:
        clients = {role: PodClient(f"127.0.0.1:{port}") for role, (port, _core) in pods.items()}
        try:
            pre = await clients[Role.PREFILL].prefill("r1", prompt, PARAMS)
            assert pre.prompt_logprobs is not None and len(pre.prompt_logprobs) == len(prompt)
            assert [e.token_id for e in pre.prompt_logprobs[1:]] == list(prompt[1:])
            rest = await _decode(clients[Role.DECODE], "r1", prompt + (pre.first_token_id,), len(prompt),
                                 pre.kv_handle)
            assert rest and all(c.prompt_logprobs is None for c in rest)
            for role in (Role.UNIFIED, Role.DECODE):  # unified, and decode-only without a handle
                chunks = await _decode(clients[role], f"u-{role.value}", prompt, len(prompt))
                assert chunks[0].token_ids[0] == pre.first_token_id
                assert chunks[0].prompt_logprobs is not None
                _same(chunks[0].prompt_logprobs, pre.prompt_logprobs)
                assert all(c.prompt_logprobs is None for c in chunks[1:])
        finally:
            for client in clients.values():
                await client.close()
        await wait_clean(*(core for _port, core in pods.values()))
