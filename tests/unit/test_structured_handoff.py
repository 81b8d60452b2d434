"""A constrained request gives the same tokens however it is split: unified,
prefill pod (token 0 under the mask) + decode pod (matcher replays it),
after preemption by recompute, and after a mid-stream failover that resends
prompt + tokens so far. Greedy and seeded sampling; every test leak-free."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from pod_fixtures import Cluster, collect, disaggregated, wait_clean
from structured_fixtures import BOUNDED_GUIDE_SCHEMA, GUIDE_SCHEMA

from splitserve.engine import LLM, SamplingParams
from splitserve.engine.structured import Constraint
from splitserve.pod.messages import KVSource, Role
from splitserve.pod.proto_convert import sampling_from_proto, sampling_to_proto

ARGS = dict(device="cpu", block_size=8, max_model_len=256)
GUIDE = Constraint.json_schema(BOUNDED_GUIDE_SCHEMA, disable_any_whitespace=True, disable_additional_properties=True)
PARAMS = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=210, constraint=GUIDE),
    "seeded": SamplingParams(temperature=1.0, top_k=50, seed=11, max_tokens=210, constraint=GUIDE),
}


def _prompts(seed: int, n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 272, (int(k),), generator=gen).tolist() for k in torch.randint(3, 30, (n,), generator=gen)]


def _run(llm: LLM, request_id: str, prompt: list[int], params: SamplingParams, **kwargs: object) -> list[int]:
    core = llm.engine_core
    core.add_request(request_id, prompt, params, **kwargs)  # type: ignore[arg-type]
    tokens: list[int] = []
    while True:
        for out in core.step():
            if out.request_id == request_id:
                tokens += out.new_token_ids
                if out.finished:
                    if kwargs.get("prefill_only") and out.held_block_ids is not None:
                        core.release_held_blocks(request_id)
                    return tokens


@pytest.mark.parametrize("mode", list(PARAMS))
def test_unified_equals_prefill_plus_decode_preemption_and_failover(tiny_checkpoints: dict, mode: str) -> None:
    path: Path = tiny_checkpoints["llama"]
    params = PARAMS[mode]
    prompts = _prompts(0, 8)
    unified = LLM(str(path), **ARGS, num_gpu_blocks_override=512)
    want = [o.outputs[0].token_ids for o in unified.generate([{"prompt_token_ids": p} for p in prompts], params)]
    for tokens in want:
        jsonschema.validate(json.loads(unified.tokenizer.decode(tokens)), GUIDE_SCHEMA)

    prefill = LLM(str(path), **ARGS, num_gpu_blocks_override=512)
    decode = LLM(str(path), **ARGS, num_gpu_blocks_override=512)
    for i, (prompt, expected) in enumerate(zip(prompts, want)):
        first = _run(prefill, f"p{i}", prompt, params, prefill_only=True)
        assert first == expected[:1]
        rest = _run(decode, f"d{i}", prompt, params, output_token_ids=first)
        assert first + rest == expected, f"prompt {i}: prefill + decode differs from unified"
        cut = len(expected) // 2
        resumed = _run(decode, f"f{i}", prompt, params, output_token_ids=expected[:cut])
        assert expected[:cut] + resumed == expected, f"prompt {i}: failover at {cut} differs"

    # A request needs up to 32 blocks (max_model_len 256; these use ~8-25); 8 at once do not fit in 40.
    small = LLM(str(path), **ARGS, num_gpu_blocks_override=40)
    got = [o.outputs[0].token_ids for o in small.generate([{"prompt_token_ids": p} for p in prompts], params)]
    assert small.engine_core.stats().scheduler.num_preemptions > 0
    assert got == want
    for llm in (unified, prefill, decode, small):
        llm.engine_core.check_no_leaks()


SMALL = Constraint.json_schema(
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999},
                                      "tag": {"enum": ["a", "bb", "ccc"]}, "ok": {"type": "boolean"}},
     "required": ["id", "tag", "ok"]},
    disable_any_whitespace=True, disable_additional_properties=True)


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_pods_hand_off_constrained_requests_token_exact(tiny_checkpoints: dict) -> None:
    cluster = Cluster(tiny_checkpoints["llama"])
    try:
        prefill = await cluster.pod(Role.PREFILL, "p:1")
        decode = await cluster.pod(Role.DECODE, "d:1")
        unified = await cluster.pod(Role.UNIFIED, "u:1")
        for mode in ("greedy", "seeded"):
            # Through the wire format, as the router sends it.
            params = sampling_from_proto(sampling_to_proto(
                SamplingParams(temperature=0.0 if mode == "greedy" else 0.9, seed=5, max_tokens=64, constraint=SMALL)))
            for i, prompt in enumerate(_prompts(1, 4)):
                want, local = await collect(unified, f"u{mode}{i}", prompt, params)
                got, finished = await disaggregated(prefill, decode, f"r{mode}{i}", prompt, params)
                assert got == want and finished.reason == local.reason == "stop"
                assert finished.kv_source is KVSource.PULLED
                value = json.loads(prefill.engine.core.structured.tokenizer().decode_str(got))
                assert set(value) == {"id", "tag", "ok"}
                cut = len(want) // 2
                rest, _ = await collect(decode, f"f{mode}{i}", prompt + want[:cut], params,
                                        num_prompt_tokens=len(prompt))
                assert want[:cut] + rest == want
        await wait_clean(prefill, decode, unified)
    finally:
        await cluster.close()
