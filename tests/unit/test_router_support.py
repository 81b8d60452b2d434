"""Shared helpers of the router tests (no tests here): the tiny model's
tokenizer, and an app on a FakeBackend."""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import httpx

from splitserve.engine.tiny_model import write_tokenizer
from splitserve.engine.tokenizer import load_tokenizer
from splitserve.router.app import create_app
from splitserve.router.fake_backend import FakeBackend
from splitserve.router.serving import OpenAIServing
from splitserve.router.settings import RouterSettings

MODEL = "tiny"


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    """The built-in tiny model's byte-level ChatML tokenizer (no weights needed)."""
    out = Path(tempfile.mkdtemp(prefix="router-tok-"))
    write_tokenizer(out)
    return load_tokenizer(out)


def encode(text: str) -> list[int]:
    return tokenizer().encode(text, add_special_tokens=False)


def text_script(text: str, eos: bool = True):
    """A FakeBackend script answering ``text`` (then EOS)."""
    ids = encode(text) + ([tokenizer().eos_token_id] if eos else [])
    return lambda request: ids


def make_serving(backend: FakeBackend | None = None, **settings: Any) -> OpenAIServing:
    backend = backend or FakeBackend(vocab_size=len(tokenizer()), eos_token_id=tokenizer().eos_token_id)
    settings.setdefault("served_model_names", (MODEL,))
    return OpenAIServing(backend, tokenizer(), RouterSettings(**settings))


def make_client(serving: OpenAIServing) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(serving)),
                             base_url="http://router")


def sse_events(body: str) -> list[Any]:
    """Parse an SSE body into JSON events; the final ``[DONE]`` becomes "DONE"."""
    events: list[Any] = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append("DONE" if payload == "[DONE]" else json.loads(payload))
    return events
