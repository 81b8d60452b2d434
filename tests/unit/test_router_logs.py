"""No log line carries prompt or output text unless enable_log_requests
(vLLM's --enable-log-requests) is on; caplog captures every logger at DEBUG
over served, streamed, refused and failed requests. The backend is
``FakeBackend``, a test double of the pods."""
from __future__ import annotations

import logging

import pytest
from test_router_support import MODEL, make_client, make_serving, text_script, tokenizer

from splitserve.router.fake_backend import FakeBackend

PROMPT = "tell me the launch code zebra-4417"
OUTPUT = "the code is quokka-9981"
SECRETS = ("zebra-4417", "quokka-9981")


async def _traffic(enable: bool) -> None:
    backend = FakeBackend(vocab_size=len(tokenizer()), eos_token_id=tokenizer().eos_token_id,
                          script=text_script(OUTPUT))
    serving = make_serving(backend, enable_log_requests=enable, max_tokens_limit=64, api_key="k")
    auth = {"Authorization": "Bearer k"}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    async with make_client(serving) as client:
        assert (await client.post("/v1/chat/completions", json=chat, headers=auth)).status_code == 200
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "stream": True},
                              headers=auth)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        # Refused: a bad field beside the prompt, a wrong key, a prompt over the limit.
        assert (await client.post("/v1/chat/completions", json={**chat, "n": 99}, headers=auth)).status_code == 400
        assert (await client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT},
                                  headers={"Authorization": "Bearer zebra-4417"})).status_code == 401
        assert (await client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT * 5000},
                                  headers=auth)).status_code == 400
        backend.fail_after = 3  # a backend failure mid-request
        assert (await client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT},
                                  headers=auth)).status_code == 500


@pytest.mark.asyncio
async def test_logs_carry_no_prompt_or_output_text_by_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        await _traffic(enable=False)
    assert caplog.records, "nothing was logged at all: the check below would prove nothing"
    for secret in SECRETS:
        assert secret not in caplog.text
        assert not any(secret in repr(r.args) or secret in str(r.msg) for r in caplog.records)


@pytest.mark.asyncio
async def test_enable_log_requests_logs_prompt_and_output(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        await _traffic(enable=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "splitserve.router.serving"]
    assert any("zebra-4417" in line and "prompt" in line for line in lines), lines
    assert any("quokka-9981" in line and "output" in line for line in lines), lines
