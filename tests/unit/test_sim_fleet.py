"""Many sim pods in one process and loop: membership operations, the
discovery file, the shared HTTP port (health, per-pod and merged metrics,
control API), restarts giving new incarnations and cold caches, and the
exact cache mirror behind the oracle. Sim pods are test doubles of engine
pods (the real pod code, a latency model instead of a model)."""
from __future__ import annotations

import json

import httpx
import pytest

from splitserve.engine.block_hash import hash_prompt_blocks
from splitserve.engine.sampling_params import SamplingParams
from splitserve.pod.messages import Role
from splitserve.router.pd_client import PodClient
from splitserve.sim.config import PodGroup, SimConfig, SimModel
from splitserve.sim.control_http import create_control_app
from splitserve.sim.latency_model import LatencyParams
from splitserve.sim.sim_fleet import SimFleet

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]
FAST = LatencyParams(prefill_overhead_s=0.0002, prefill_per_token_s=0.0, decode_base_s=0.0002,
                     decode_per_seq_s=0.0, kv_overhead_s=0.0002, jitter=0.0)


async def test_fleet_membership_discovery_file_and_control_api(tmp_path) -> None:
    discovery = tmp_path / "pods.json"
    config = SimConfig(groups=(PodGroup(Role.PREFILL, 3), PodGroup(Role.DECODE, 3), PodGroup(Role.UNIFIED, 2)),
                       model=SimModel.tiny(), base_port=0, http_port=0, num_blocks=64, latency=FAST,
                       discovery_file=str(discovery), slow_pods=1, slow_factor=3.0)
    fleet = SimFleet(config)
    await fleet.start()
    app = create_control_app(fleet, lambda: "ok")
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")
    try:
        doc = json.loads(discovery.read_text())
        assert doc["version"] == 1 and len(doc["pods"]) == 8
        assert {p["state"] for p in doc["pods"]} == {"ready"}
        assert len({p["address"] for p in doc["pods"]}) == 8
        assert sum(p.latency.slow_factor == 3.0 for p in fleet.pods.values()) == 1

        # A request on a unified pod: the oracle mirror sees its blocks.
        unified = fleet.serving_pods(Role.UNIFIED)[0]
        client = PodClient(unified.address)
        prompt = tuple(range(20, 70))
        async for _ in client.decode("u1", prompt, 0, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)):
            pass
        await client.close()
        assert unified.mirror.match_blocks(hash_prompt_blocks(prompt, 16)) == 3

        health = await http.get("/health")
        assert health.status_code == 200 and health.json()["pods"] == {"ready": 8}
        metrics = (await http.get("/metrics")).text
        assert f'splitserve:num_requests_running{{pod="{unified.name}"}}' in metrics
        assert 'splitserve:request_success_total{finished_reason="length",pod="' + unified.name + '"} 1.0' in metrics
        assert (await http.get(f"/pods/{unified.name}/metrics")).status_code == 200

        added = (await http.post("/pods", json={"role": "decode"})).json()
        assert added["status"] == "ready" and added["name"] == "decode-008"
        assert len(json.loads(discovery.read_text())["pods"]) == 9
        victim = fleet.serving_pods(Role.PREFILL)[0]
        old = victim.incarnation_id()
        assert (await http.post(f"/pods/{victim.name}/stop", params={"grace_seconds": 0.1})).json() == \
            {"status": "stopped"}
        assert victim.address not in discovery.read_text()
        assert (await http.get(f"/pods/{victim.name}/health")).status_code == 503
        assert (await http.post(f"/pods/{victim.name}/start")).json()["incarnation_id"] != old
        assert (await http.delete("/pods/decode-008")).json() == {"removed": "decode-008"}
        assert (await http.get("/pods/decode-008/health")).status_code == 404
        assert (await http.post("/pods", json={"role": "bogus"})).status_code == 400
        assert (await http.put("/fleet/faults", json={"kv_failure_rate": 2})).status_code == 400
        assert (await http.put("/fleet/faults", json={"kv_failure_rate": 0.5})).json()["kv_failure_rate"] == 0.5

        before = {p.name: p.incarnation_id() for p in fleet.pods.values()}
        assert (await http.post("/fleet/restart")).status_code == 200
        assert all(before[p.name] != p.incarnation_id() for p in fleet.pods.values())
        assert len(unified.mirror) == 0 and fleet.oracle.records() == []
        held = (await http.get("/fleet/held")).json()
        assert held["idle"] and len(held["pods"]) == 8
        assert (await http.get("/fleet/memory")).json()["rss_bytes"] > 0
    finally:
        await http.aclose()
        await fleet.close()
    assert json.loads(discovery.read_text())["pods"] == []
