"""Schemathesis against a running `splitserve up` (1 prefill + 1 decode, every
request disaggregated, API key set), reading the OpenAPI description from the
router with the key: schema-valid and schema-violating bodies, over real HTTP,
gRPC and NIXL. No answer is a 5xx, no call hangs (each has a timeout), and
both pods end with 0 blocks used and 0 leases. Generation stays short: the
router caps max_tokens at 8 and the pods' context at 256."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from e2e_support import running_cluster, wait_until_idle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from splitserve.local.launcher import LocalCluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
KEY = "e2e-fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_EXAMPLES = 300  # per mode


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(tiny_model, max_model_len=256,
                         router_args=["--pd-threshold-tokens", "0", "--max-tokens-limit", "8"],
                         env={"SPLITSERVE_API_KEY": KEY}, log_dir=tmp_path_factory.mktemp("logs-fuzz")) as c:
        yield c


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_fuzzed_requests_through_real_pods_get_no_5xx_and_leak_nothing(cluster: LocalCluster,
                                                                        mode: GenerationMode) -> None:
    base = cluster.base_url.removesuffix("/v1")
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    seen: dict[int, int] = {}

    @given(data=st.data())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(data: st.DataObject) -> None:
        operation = data.draw(st.sampled_from(operations), label="operation")
        case = data.draw(operation.as_strategy(generation_mode=mode), label="case")
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = cluster.config.model
        response = case.call(base_url=base, headers=AUTH, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (response.status_code, response.text[:500], case.body)

    fuzz()
    print(f"{mode.value} through splitserve up: status counts {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= MAX_EXAMPLES // 2
    assert seen.get(200 if mode is GenerationMode.POSITIVE else 400, 0) > 0
    loads = wait_until_idle(cluster)
    assert all(s.num_used_blocks == 0 and s.num_leased_blocks == 0 for s in loads.values()), loads
