"""Shared helpers of the router tests (no tests here): a small byte-level BPE
tokenizer with a ChatML template, and an app on a FakeBackend."""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import httpx

from splitserve.router.app import create_app
from splitserve.router.fake_backend import FakeBackend
from splitserve.router.serving import OpenAIServing
from splitserve.router.settings import RouterSettings

MODEL = "tiny"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = ["hello world, the quick brown fox jumps over the lazy dog. STOP here. "
           "héllo wörld 日本語 🙂 naïve café"] * 20


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    out = Path(tempfile.mkdtemp(prefix="router-tok-"))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
        "chat_template": CHATML, "model_max_length": 4096}))
    return AutoTokenizer.from_pretrained(str(out))


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
