"""The security flags through real OS processes: prefill and decode pods with
mutual TLS on gRPC (the decode pod dials the prefill pod with its own
certificate, KV over real NIXL), a router with HTTPS on the API, mutual TLS
to the pods and an API key, all from the CLI. A completion goes through; the
pods refuse plaintext gRPC; no log of any process carries the prompt or the
output text; both pods end with 0 blocks used and 0 leases."""
from __future__ import annotations

import json
import os
import ssl
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest

pytest.importorskip("nixl")

from test_pd_serving import HOST, group, start_pods  # noqa: E402,F401 - `group` is a fixture
from tls_support import TestCA  # noqa: E402

from splitserve.local.launcher import free_port  # noqa: E402
from splitserve.local.process_group import ProcessGroup  # noqa: E402
from splitserve.proto import splitserve_v1_pb2 as pb  # noqa: E402
from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
POD_NAME = "pods.splitserve.test"
KEY = "sk-integration"
SECRET_PROMPT = "the vault opens with walrus-5150"


def _grpc_flags(cert, ca: TestCA) -> list[str]:
    return ["--grpc-ssl-certfile", cert.certfile, "--grpc-ssl-keyfile", cert.keyfile,
            "--grpc-ssl-ca-certs", ca.ca_certs, "--grpc-ssl-server-name", POD_NAME]


def _tls_stub(port: int, cert, ca: TestCA) -> pb_grpc.EngineStub:
    credentials = grpc.ssl_channel_credentials(Path(ca.ca_certs).read_bytes(), Path(cert.keyfile).read_bytes(),
                                               Path(cert.certfile).read_bytes())
    channel = grpc.secure_channel(f"{HOST}:{port}", credentials, options=[("grpc.ssl_target_name_override",
                                                                            POD_NAME)])
    return pb_grpc.EngineStub(channel)


def test_https_api_key_and_mutual_tls_through_real_processes(group: ProcessGroup, tmp_path: Path,
                                                             tiny_checkpoints: dict) -> None:
    model = tiny_checkpoints["llama"]
    ca = TestCA(tmp_path)
    pod_cert, router_cert, api_cert = (ca.issue("pod", dns=(POD_NAME,), ips=()), ca.issue("router-client"),
                                       ca.issue("router-api"))
    logs = tmp_path / "logs"
    prefill, decode = start_pods(group, logs, model, [("prefill", _grpc_flags(pod_cert, ca)),
                                                      ("decode", _grpc_flags(pod_cert, ca))])
    port = free_port(HOST)
    argv = [sys.executable, "-m", "splitserve", "router", "--model", str(model), "--host", HOST,
            "--port", str(port), "--block-size", "8", "--prefill", f"{HOST}:{prefill.grpc_port}",
            "--decode", f"{HOST}:{decode.grpc_port}", "--pd-threshold-tokens", "0",
            "--ssl-keyfile", api_cert.keyfile, "--ssl-certfile", api_cert.certfile, *_grpc_flags(router_cert, ca)]
    router = group.start("router", argv, env={**os.environ, "SPLITSERVE_API_KEY": KEY},
                         log_path=logs / "router.log")
    verify = ssl.create_default_context(cafile=ca.ca_certs)
    url = f"https://{HOST}:{port}"
    with httpx.Client(verify=verify, timeout=60) as client:
        deadline = time.monotonic() + 90
        while True:
            assert router.is_running(), (logs / "router.log").read_text()[-3000:]
            try:
                if client.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (logs / "router.log").read_text()[-3000:]
            time.sleep(0.2)
        body = {"model": str(model), "prompt": SECRET_PROMPT * 3, "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}
        assert client.post(f"{url}/v1/completions", json=body).status_code == 401
        r = client.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["text"]
        assert r.json()["usage"]["completion_tokens"] == 8
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{HOST}:{port}/health", timeout=5)  # plaintext to the HTTPS port
    # The KV came over NIXL after the decode pod's TLS handshake with the prefill pod (no recompute).
    assert decode.metric("splitserve:kv_transfer_bytes_total") > 0
    assert decode.metric("splitserve:kv_transfer_failures_total") == 0

    for pod in (prefill, decode):
        with pytest.raises(grpc.RpcError) as info:
            pod.stub.GetLoad(pb.GetLoadRequest(), timeout=5)  # start_pods' stubs are plaintext
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    stubs = [_tls_stub(pod.grpc_port, router_cert, ca) for pod in (prefill, decode)]
    deadline = time.monotonic() + 15
    while True:
        loads = [stub.GetLoad(pb.GetLoadRequest(), timeout=5) for stub in stubs]
        if all(ld.num_free_blocks == ld.num_total_blocks and ld.num_leased_blocks == 0 for ld in loads):
            break
        assert time.monotonic() < deadline, loads
        time.sleep(0.1)
    text = {path.name: path.read_text(errors="replace") for path in logs.iterdir()}
    assert set(text) == {"router.log", f"prefill-{prefill.grpc_port}.log", f"decode-{decode.grpc_port}.log"}
    assert "mutual TLS" in text[f"prefill-{prefill.grpc_port}.log"]
    for name, content in text.items():
        assert "walrus-5150" not in content, name
        if len(answer.strip()) >= 6:  # long enough not to turn up in a log by chance
            assert json.dumps(answer)[1:-1] not in content, name
