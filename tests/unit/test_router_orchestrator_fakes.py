"""A deterministic in-process ``Engine`` servicer (no model) for the
orchestrator tests: grpc.aio servers on free ports (no tests here).

Output token ``i`` of a request is a hash of (prompt, seed, i), so a prompt's
tokens are the same whichever pod computes which part: prefill token 0 here,
the rest there, or everything on one pod, or a failover mid-stream.
"""
from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

import grpc

from splitserve.engine.block_hash import hash_prompt_blocks
from splitserve.proto import splitserve_v1_pb2 as pb
from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc

VOCAB = 256
EOS = 255
BLOCK = 4


def token_at(prompt: tuple[int, ...], seed: int, index: int) -> int:
    digest = hashlib.sha256(f"{list(prompt)}|{seed}|{index}".encode()).digest()
    return digest[0] % (VOCAB - 1)  # never EOS unless scripted


def reference(prompt: tuple[int, ...], seed: int, max_tokens: int) -> list[int]:
    return [token_at(prompt, seed, i) for i in range(max_tokens)]


def logprobs_of(token: int, k: int) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(token_id=token, logprob=-0.25, rank=1,
                            top_token_ids=[(token + j) % VOCAB for j in range(k)],
                            top_logprobs=[-0.25 - j for j in range(k)])


@dataclass
class FakeEngine(pb_grpc.EngineServicer):
    """One fake pod. Scripted failures: ``prefill_failures`` (codes, popped
    per Prefill), ``decode_fail_after`` (UNAVAILABLE after that many chunks),
    ``decode_failures`` (codes popped per Decode, before any token),
    ``kv_source`` reported on Finished; ``token_delay_s`` between chunks;
    ``expire_leases``: handles point at nothing (as after a lease expiry)."""

    name: str
    role: int = pb.ROLE_DECODE
    leases: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    prefills: list[pb.PrefillRequest] = field(default_factory=list)
    decodes: list[pb.DecodeRequest] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    prefill_failures: list[grpc.StatusCode] = field(default_factory=list)
    decode_failures: list[grpc.StatusCode] = field(default_factory=list)
    decode_fail_after: int | None = None
    kv_source: int = pb.KV_SOURCE_PULLED
    token_delay_s: float = 0.0
    prefill_delay_s: float = 0.0
    prefill_started: asyncio.Event = field(default_factory=asyncio.Event)
    expire_leases: bool = False
    eos_at: int | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    address: str = ""
    peers: dict[str, FakeEngine] = field(default_factory=dict)

    def _token(self, prompt: tuple[int, ...], seed: int, index: int) -> int:
        return EOS if self.eos_at == index else token_at(prompt, seed, index)

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        self.prefills.append(request)
        self.prefill_started.set()
        await asyncio.sleep(self.prefill_delay_s)
        if self.prefill_failures:
            await context.abort(self.prefill_failures.pop(0), f"{self.name}: scripted failure")
        prompt = tuple(request.token_ids)
        if not prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty prompt")
        first = self._token(prompt, request.sampling.seed, 0)
        response = pb.PrefillResponse(first_token_id=first, num_prompt_tokens=len(prompt))
        if request.sampling.HasField("logprobs"):
            response.first_logprobs.CopyFrom(logprobs_of(first, request.sampling.logprobs))
        max_tokens = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 16
        if first == EOS or max_tokens <= 1:
            response.finish_reason = pb.FINISH_REASON_STOP if first == EOS else pb.FINISH_REASON_LENGTH
            return response
        if not self.expire_leases:
            self.leases.add(request.request_id)
        response.kv_handle.CopyFrom(pb.KVHandle(request_id=request.request_id, peer_address=self.address,
                                                num_tokens=len(prompt)))
        await self.events.put(hash_prompt_blocks(prompt, BLOCK))
        return response

    async def DecodeStream(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        # Like a pod from before DecodeStream (its server has no such method),
        # so the router falls back to Decode calls. The generated base class
        # raises instead, which grpc sometimes reports as UNKNOWN.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

    async def PrefillStream(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")  # as DecodeStream above

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext):
        self.decodes.append(request)
        if self.decode_failures:
            await context.abort(self.decode_failures.pop(0), f"{self.name}: scripted failure")
        tokens = tuple(request.token_ids)
        prompt = tokens[:request.num_prompt_tokens]
        done = list(tokens[request.num_prompt_tokens:])
        source = pb.KV_SOURCE_LOCAL
        if request.HasField("kv_handle"):
            peer = self.peers.get(request.kv_handle.peer_address)
            if peer is None or request.kv_handle.request_id not in peer.leases:
                await context.abort(grpc.StatusCode.NOT_FOUND, "unknown KV handle")
            peer.leases.discard(request.kv_handle.request_id)  # pulled and released
            source = self.kv_source
        params = request.sampling
        max_tokens = params.max_tokens if params.HasField("max_tokens") else 16
        self.running.add(request.request_id)
        sent = 0
        try:
            while True:
                if len(done) >= max_tokens:
                    reason = pb.FINISH_REASON_LENGTH
                    break
                if done and done[-1] == EOS:
                    reason = pb.FINISH_REASON_STOP
                    break
                if self.decode_fail_after is not None and sent >= self.decode_fail_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name}: scripted crash")
                await asyncio.sleep(self.token_delay_s)
                token = self._token(prompt, params.seed, len(done))
                done.append(token)
                chunk = pb.TokenChunk(token_ids=[token])
                if params.HasField("logprobs"):
                    chunk.logprobs.append(logprobs_of(token, params.logprobs))
                sent += 1
                yield pb.DecodeResponse(chunk=chunk)
            yield pb.DecodeResponse(finished=pb.Finished(
                reason=reason, num_prompt_tokens=len(prompt),
                num_output_tokens=len(done), kv_source=source))
        except (asyncio.CancelledError, GeneratorExit):
            # GeneratorExit: the cancel came while grpc was writing a response (not in the sleep),
            # so grpc closed the generator at its yield.
            self.cancelled.append(request.request_id)
            raise
        finally:
            self.running.discard(request.request_id)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        self.aborts.append(request.request_id)
        found = request.request_id in self.leases or request.request_id in self.running
        self.leases.discard(request.request_id)
        return pb.AbortResponse(found=found)

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadReport:
        return pb.LoadReport(role=self.role, incarnation_id=f"{self.name}-1", num_running=len(self.running),
                             num_free_blocks=100 - len(self.leases), num_total_blocks=100,
                             block_size=BLOCK, num_leased_blocks=len(self.leases))

    async def StreamKVEvents(self, request: pb.StreamKVEventsRequest, context: grpc.aio.ServicerContext):
        yield pb.KVEventBatch(all_cleared=True, block_hash_version=1)
        while True:
            stored = await self.events.get()
            yield pb.KVEventBatch(stored_block_hashes=stored, block_hash_version=1)


@dataclass
class FakeCluster:
    """Fake pods on one grpc.aio server each; ``peers`` lets decoders "pull"."""

    pods: dict[str, FakeEngine] = field(default_factory=dict)
    servers: list[grpc.aio.Server] = field(default_factory=list)

    async def add(self, name: str, role: int) -> FakeEngine:
        engine = FakeEngine(name=name, role=role, peers=self.pods)
        server = grpc.aio.server()
        pb_grpc.add_EngineServicer_to_server(engine, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        engine.address = f"127.0.0.1:{port}"
        self.pods[engine.address] = engine
        self.servers.append(server)
        return engine

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop(grace=None) for s in self.servers))
