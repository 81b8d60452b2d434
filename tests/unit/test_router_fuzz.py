"""Schemathesis fuzzes the router app from its own OpenAPI description (read
with the API key, as a client would): schema-valid and schema-violating
bodies on every operation, sent in-process over ASGI with the key. No answer
may be a 5xx; every 4xx is OpenAI-shaped; the whole run is bounded by the
test timeout, so a hang fails it. The backend is ``FakeBackend``, a test
double of the pods; small limits keep each generation cheap."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from test_router_support import MODEL, make_serving

from splitserve.router.app import create_app

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = dict(max_prompt_tokens=256, max_tokens_limit=8, max_n=3, max_request_body_bytes=256 * 1024)
MAX_EXAMPLES = 400  # per mode, all operations together; the run takes about 15 s


@pytest.fixture(scope="module")
def router_schema() -> schemathesis.BaseSchema:
    app = create_app(make_serving(api_key=KEY, **LIMITS))
    return schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)


def _operations(schema: schemathesis.BaseSchema) -> list[schemathesis.APIOperation]:
    return [result.ok() for result in schema.get_all_operations()]


def test_the_description_names_every_operation_and_its_bodies(router_schema: schemathesis.BaseSchema) -> None:
    ops = {(op.method.upper(), op.path): op for op in _operations(router_schema)}
    assert {("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
            ("GET", "/health"), ("GET", "/metrics")} <= set(ops)
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert ops[("POST", path)].body, f"{path} has no request body in the OpenAPI description"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_fuzzed_request_gets_a_5xx(router_schema: schemathesis.BaseSchema, mode: GenerationMode) -> None:
    operations = _operations(router_schema)
    seen: dict[int, int] = {}
    generated: dict[str, int] = {}  # POST path -> fuzzed bodies that got a 200

    @given(data=st.data())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(data: st.DataObject) -> None:
        operation = data.draw(st.sampled_from(operations), label="operation")
        case = data.draw(operation.as_strategy(generation_mode=mode), label="case")
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL  # any other name is a 404 before the rest is looked at
        response = case.call(headers=AUTH)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        if response.status_code == 200 and operation.method.upper() == "POST":
            generated[operation.path] = generated.get(operation.path, 0) + 1
        assert response.status_code < 500, (response.status_code, response.text[:500], case.body)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == response.status_code

    fuzz()
    backend = router_schema.app.state.serving.backend
    open_streams = [r.request_id for r in backend.requests
                    if r.request_id not in set(backend.finished) | set(backend.cancelled)]
    assert open_streams == []  # every backend stream a fuzzed request started has ended
    print(f"{mode.value}: status counts {dict(sorted(seen.items()))}, generated {generated}")
    assert sum(seen.values()) >= MAX_EXAMPLES // 2
    if mode is GenerationMode.POSITIVE:  # the fuzz reached generation, not only the validators
        assert {"/v1/chat/completions", "/v1/completions"} <= set(generated)
    else:
        assert seen.get(400, 0) > 0
