"""Prefill and decode pods as real OS processes (``python -m splitserve serve``),
real gRPC, real NIXL: token-exact hand-off vs transformers, only missing blocks
travel, lease expiry, abort, incompatible peers, prefill restarts. Every test
ends with both pods at zero used and zero leased blocks (GetLoad)."""
from __future__ import annotations

import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

pytest.importorskip("nixl")

from splitserve.engine.sampling_params import SamplingParams  # noqa: E402
from splitserve.local.launcher import free_port, is_healthy  # noqa: E402
from splitserve.local.process_group import ManagedProcess, ProcessGroup  # noqa: E402
from splitserve.proto import splitserve_v1_pb2 as pb  # noqa: E402
from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc  # noqa: E402
from splitserve.pod.proto_convert import sampling_to_proto  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HOST = "127.0.0.1"
MAX_TOKENS = 8
GREEDY = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
ENGINE = ["--device", "cpu", "--block-size", "8", "--max-model-len", "128", "--attention-backend", "torch",
          "--num-gpu-blocks-override", "64"]


@dataclass
class Pod:
    role: str
    grpc_port: int
    http_port: int
    process: ManagedProcess
    stub: pb_grpc.EngineStub

    def load(self) -> pb.LoadReport:
        return self.stub.GetLoad(pb.GetLoadRequest(), timeout=5)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise AssertionError(f"{name} not exported")


def start_pods(group: ProcessGroup, log_dir: Path, model: Path, specs: list[tuple[str, list[str]]],
               ports: list[tuple[int, int]] | None = None) -> list[Pod]:
    pods = []
    for i, (role, extra) in enumerate(specs):
        gp, hp = ports[i] if ports else (free_port(HOST), free_port(HOST))
        argv = [sys.executable, "-m", "splitserve", "serve", role, "--model", str(model), "--host", HOST,
                "--port", str(gp), "--http-port", str(hp), *ENGINE, *extra]
        process = group.start(f"{role}-{gp}", argv, log_path=log_dir / f"{role}-{gp}.log")
        pods.append(Pod(role, gp, hp, process, pb_grpc.EngineStub(grpc.insecure_channel(f"{HOST}:{gp}"))))
    deadline = time.monotonic() + 60
    for pod in pods:
        while not is_healthy(HOST, pod.http_port):
            if not pod.process.is_running() or time.monotonic() > deadline:
                log = pod.process.log_path.read_text()[-3000:] if pod.process.log_path else ""
                raise RuntimeError(f"{pod.role} pod did not become healthy:\n{log}")
            time.sleep(0.1)
    return pods


def stop_pod(group: ProcessGroup, pod: Pod) -> None:
    pod.process.popen.terminate()
    assert pod.process.popen.wait(timeout=30) == 0  # a clean drain exits 0
    group.processes.remove(pod.process)


def assert_clean(*pods: Pod, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        loads = [p.load() for p in pods]
        if all(ld.num_free_blocks == ld.num_total_blocks and ld.num_leased_blocks == 0 for ld in loads):
            return
        assert time.monotonic() < deadline, f"blocks still used or leased: {loads}"
        time.sleep(0.05)


def prefill(pod: Pod, request_id: str, prompt: list[int]) -> pb.PrefillResponse:
    request = pb.PrefillRequest(request_id=request_id, token_ids=prompt, sampling=GREEDY)
    return pod.stub.Prefill(request, timeout=30)


def decode(pod: Pod, request_id: str, prompt: list[int],
           first: pb.PrefillResponse) -> tuple[list[int], pb.DecodeResponse]:
    request = pb.DecodeRequest(request_id=request_id, token_ids=prompt + [first.first_token_id],
                               num_prompt_tokens=len(prompt), sampling=GREEDY, kv_handle=first.kv_handle)
    tokens, last = [first.first_token_id], None
    for event in pod.stub.Decode(request, timeout=30):
        last = event
        tokens += list(event.chunk.token_ids) if event.WhichOneof("event") == "chunk" else []
    assert last is not None
    return tokens, last


def prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 288, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture
def group(tmp_path: Path) -> Iterator[ProcessGroup]:
    g = ProcessGroup()
    yield g
    g.stop_all()


@pytest.fixture(scope="module")
def hf_greedy(tiny_checkpoints: dict):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoints["llama"]), dtype=torch.float32)

    def run(prompt: list[int]) -> list[int]:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                             do_sample=False, eos_token_id=None)
        return out[0, len(prompt):].tolist()

    return run


@pytest.mark.parametrize("ucx_tls", [None, "tcp"], ids=["ucx-default", "ucx-tcp"])
def test_greedy_handoff_equals_transformers(tiny_checkpoints: dict, hf_greedy, group: ProcessGroup,
                                            tmp_path: Path, ucx_tls: str | None) -> None:
    extra = ["--ucx-tls", ucx_tls] if ucx_tls else []
    p, d = start_pods(group, tmp_path, tiny_checkpoints["llama"], [("prefill", extra), ("decode", extra)])
    batch = prompts(0, (3, 8, 17, 29))
    firsts = [prefill(p, f"r{i}", prompt) for i, prompt in enumerate(batch)]  # all leased at once
    for i, (prompt, first) in enumerate(zip(batch, firsts)):
        tokens, last = decode(d, f"r{i}", prompt, first)
        assert tokens == hf_greedy(prompt), f"prompt {i}"
        assert last.finished.kv_source == pb.KV_SOURCE_PULLED
        assert last.finished.num_pulled_blocks == -(-len(prompt) // 8)
    assert_clean(p, d)


def test_second_turn_pulls_only_missing_blocks_and_abort_releases_lease(
        tiny_checkpoints: dict, group: ProcessGroup, tmp_path: Path) -> None:
    p, d = start_pods(group, tmp_path, tiny_checkpoints["llama"], [("prefill", []), ("decode", [])])
    meta = p.stub.GetTransferMetadata(pb.GetTransferMetadataRequest(), timeout=5)
    block_bytes = 2 * 2 * 8 * 2 * 16 * 4  # layers * kv * block_size * kv_heads * head_dim * fp32
    assert meta.layout.block_size == 8 and meta.encoded
    turn1 = prompts(1, (21,))[0]
    out1, _ = decode(d, "t1", turn1, prefill(p, "t1", turn1))
    turn2 = turn1 + out1 + prompts(2, (6,))[0]  # 21 + 8 + 6 = 35 tokens
    before = d.metric("splitserve:kv_transfer_bytes_total")
    _out2, last = decode(d, "t2", turn2, prefill(p, "t2", turn2))
    cached_on_decoder = (21 + MAX_TOKENS) // 8  # turn 1's full blocks (prompt + output)
    missing = -(-35 // 8) - cached_on_decoder
    assert last.finished.num_pulled_blocks == missing
    assert d.metric("splitserve:kv_transfer_bytes_total") - before == missing * block_bytes
    assert last.finished.num_pulled_bytes == missing * block_bytes
    # An aborted decode (client cancels its stream) releases the prefill lease at once.
    prompt = prompts(3, (40,))[0]
    first = prefill(p, "gone", prompt)
    assert p.load().num_leased_blocks == 5
    p.stub.ReleaseKV(pb.ReleaseKVRequest(request_id="gone"), timeout=5)  # what the decoder sends on abort
    assert p.load().num_leased_blocks == 0
    first = prefill(p, "gone2", prompt)
    stream = d.stub.Decode(pb.DecodeRequest(
        request_id="gone2", token_ids=prompt + [first.first_token_id], num_prompt_tokens=40,
        sampling=sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)),
        kv_handle=first.kv_handle))
    next(stream)
    stream.cancel()
    assert_clean(p, d, timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        d.stub.Abort(pb.AbortRequest(request_id="never"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_lease_expiry_frees_unpulled_blocks(tiny_checkpoints: dict, group: ProcessGroup, tmp_path: Path) -> None:
    (p,) = start_pods(group, tmp_path, tiny_checkpoints["llama"], [("prefill", ["--kv-lease-seconds", "0.5"])])
    first = prefill(p, "lonely", prompts(4, (20,))[0])
    assert first.HasField("kv_handle") and p.load().num_leased_blocks == 3
    assert_clean(p, timeout=5)
    assert p.metric("splitserve:kv_lease_expired_total") == 1
    with pytest.raises(grpc.RpcError) as info:
        p.stub.ClaimKV(pb.ClaimKVRequest(request_id="lonely", incarnation_id=first.kv_handle.incarnation_id))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_incompatible_peer_refused_and_restarted_prefill_rehandshaked(
        tiny_checkpoints: dict, group: ProcessGroup, tmp_path: Path) -> None:
    model = tiny_checkpoints["llama"]
    p, d, odd = start_pods(group, tmp_path, model,
                           [("prefill", []), ("decode", []), ("prefill", ["--block-size", "16"])])
    prompt = prompts(5, (20,))[0]
    first = prefill(odd, "odd", prompt)
    _tokens, last = decode(d, "odd", prompt, first)
    assert last.WhichOneof("event") == "error" and last.error.code == "FAILED_PRECONDITION"
    assert "block_size" in last.error.message
    want, last = decode(d, "a", prompt, prefill(p, "a", prompt))
    assert last.finished.kv_source == pb.KV_SOURCE_PULLED
    # Restart the prefill pod on the same ports: new incarnation, same agent name.
    old_incarnation = p.load().incarnation_id
    stop_pod(group, p)
    (p,) = start_pods(group, tmp_path, model, [("prefill", [])], ports=[(p.grpc_port, p.http_port)])
    assert p.load().incarnation_id != old_incarnation
    for i in range(2):
        tokens, last = decode(d, f"b{i}", prompt, prefill(p, f"b{i}", prompt))
        assert tokens == want and last.finished.kv_source == pb.KV_SOURCE_PULLED
    assert_clean(p, d, odd)
