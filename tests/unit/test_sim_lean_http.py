"""LeanConnection, the benchmarks' load-generator client, against the real
router app served by uvicorn (on a FakeBackend, a test double of the pods)."""
from __future__ import annotations

import pytest
from test_router_support import MODEL, make_serving, text_script, tokenizer

from splitserve.http_server import EmbeddedHTTPServer
from splitserve.router.app import create_app
from splitserve.router.fake_backend import FakeBackend
from splitserve.sim.fleet_launch import free_port
from splitserve.sim.lean_http import LeanConnection
from splitserve.sim.replay_client import RequestResult

pytestmark = pytest.mark.asyncio


async def serve(backend: FakeBackend) -> tuple[EmbeddedHTTPServer, str]:
    port = free_port()
    http = EmbeddedHTTPServer(create_app(make_serving(backend)), "127.0.0.1", port)
    await http.start()
    return http, f"http://127.0.0.1:{port}"


async def test_streams_over_one_kept_alive_connection() -> None:
    backend = FakeBackend(vocab_size=len(tokenizer()), eos_token_id=tokenizer().eos_token_id,
                          script=text_script("hello world, again", eos=False))
    http, url = await serve(backend)
    lean = LeanConnection(url)
    try:
        results = []
        for i in range(3):
            result = RequestResult(0, i, 0, 3, 4)
            await lean.stream_completion(MODEL, [5, 6, 7], 4, result)
            results.append(result)
        first_writer = lean._writer
        assert all(r.ok and r.error == "" for r in results), [r.error for r in results]
        assert all(len(r.tokens) == 4 and r.ttft_s is not None and r.e2e_s >= r.ttft_s for r in results)
        assert results[0].tokens == results[2].tokens
        assert first_writer is not None and not first_writer.is_closing()  # still the same connection
    finally:
        await lean.close()
        await http.stop()


async def test_a_refused_request_is_recorded_not_raised() -> None:
    http, url = await serve(FakeBackend(vocab_size=len(tokenizer()), eos_token_id=tokenizer().eos_token_id))
    lean = LeanConnection(url)
    try:
        result = RequestResult(0, 0, 0, 1, 2)
        await lean.stream_completion("no-such-model", [5], 2, result)
        assert not result.ok and result.error.startswith("HTTP 404") and "no-such-model" in result.error
        retry = RequestResult(0, 1, 0, 1, 2)
        await lean.stream_completion(MODEL, [5], 2, retry)  # the connection survives a refusal
        assert retry.ok, retry.error
    finally:
        await lean.close()
        await http.stop()


async def test_a_dead_router_is_an_error_and_bad_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="http://host:port"):
        LeanConnection("https://example:443")
    lean = LeanConnection(f"http://127.0.0.1:{free_port()}")
    result = RequestResult(0, 0, 0, 1, 2)
    await lean.stream_completion(MODEL, [5], 2, result)
    assert not result.ok and "ConnectionRefused" in result.error
