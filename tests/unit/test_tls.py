"""TLS with a CA generated in the test: HTTPS on the router's OpenAI port
(vLLM's --ssl-* flags, client certificates when --ssl-cert-reqs 2), and
mutual TLS on router -> pod and decode -> prefill gRPC (real pod servicers on
tiny engines; their KV wire is ``FakeTransport``, a test double of NIXL). The
router app runs on ``FakeBackend``, a test double of the pods."""
from __future__ import annotations

import argparse
import ssl

import grpc
import httpx
import pytest
from test_router_membership_fakes import free_port
from test_router_support import make_serving
from tls_support import TestCA

from pod_fixtures import Cluster, grpc_pods
from splitserve.decode.peer_client import GrpcPeerClient, PeerUnreachableError
from splitserve.grpc_tls import GrpcTLS, add_grpc_tls_args, grpc_tls_from_args
from splitserve.http_server import HTTPTLS, EmbeddedHTTPServer
from splitserve.pod.messages import Role
from splitserve.router.app import create_app
from splitserve.router.pd_client import PodCallError, PodClient

pytestmark = pytest.mark.timeout(180)
POD_NAME = "pods.splitserve.internal"  # the one name every pod certificate carries


def _client_context(ca: TestCA, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca.ca_certs)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


@pytest.mark.asyncio
async def test_router_https_with_vllm_flags_and_client_certificates(tmp_path) -> None:
    ca, other = TestCA(tmp_path), TestCA(tmp_path, "another CA")
    server, client, stranger = ca.issue("router"), ca.issue("client"), other.issue("stranger")
    app = create_app(make_serving(api_key="k"))
    port = free_port()
    http = EmbeddedHTTPServer(app, "127.0.0.1", port, tls=HTTPTLS(server.keyfile, server.certfile))
    await http.start()
    try:
        async with httpx.AsyncClient(verify=_client_context(ca)) as c:
            r = await c.get(f"https://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"})
            assert r.status_code == 200 and r.json()["data"]
        async with httpx.AsyncClient(verify=_client_context(other)) as c:  # a server the client cannot trust
            with pytest.raises(httpx.ConnectError):
                await c.get(f"https://127.0.0.1:{port}/health")
        async with httpx.AsyncClient() as c:  # plaintext to a TLS port gets no HTTP answer
            with pytest.raises(httpx.HTTPError):
                await c.get(f"http://127.0.0.1:{port}/health")
    finally:
        await http.stop()

    port = free_port()
    http = EmbeddedHTTPServer(app, "127.0.0.1", port, tls=HTTPTLS(
        server.keyfile, server.certfile, ca_certs=ca.ca_certs, cert_reqs=int(ssl.CERT_REQUIRED)))
    await http.start()
    try:
        async with httpx.AsyncClient(verify=_client_context(ca, (client.certfile, client.keyfile))) as c:
            assert (await c.get(f"https://127.0.0.1:{port}/health")).status_code == 200
        for context in (_client_context(ca), _client_context(ca, (stranger.certfile, stranger.keyfile))):
            async with httpx.AsyncClient(verify=context) as c:
                with pytest.raises(httpx.HTTPError):  # no certificate, or one the CA did not sign
                    await c.get(f"https://127.0.0.1:{port}/health")
    finally:
        await http.stop()


def test_tls_flags_are_validated_once(tmp_path) -> None:
    ca = TestCA(tmp_path)
    leaf = ca.issue("x")
    parser = argparse.ArgumentParser()
    add_grpc_tls_args(parser, "test")
    assert grpc_tls_from_args(parser.parse_args([])) is None
    tls = grpc_tls_from_args(parser.parse_args(["--grpc-ssl-certfile", leaf.certfile, "--grpc-ssl-keyfile",
                                                leaf.keyfile, "--grpc-ssl-ca-certs", ca.ca_certs]))
    assert tls == GrpcTLS(leaf.certfile, leaf.keyfile, ca.ca_certs)
    for argv in (["--grpc-ssl-certfile", leaf.certfile], ["--grpc-ssl-ca-certs", ca.ca_certs]):
        with pytest.raises(ValueError, match="grpc-ssl"):
            grpc_tls_from_args(parser.parse_args(argv))
    with pytest.raises(ValueError, match="no such file"):
        GrpcTLS(str(tmp_path / "missing.crt"), leaf.keyfile)
    with pytest.raises(ValueError, match="ssl-ca-certs"):
        HTTPTLS(leaf.keyfile, leaf.certfile, cert_reqs=2)
    with pytest.raises(ValueError, match="ssl-cert-reqs"):
        HTTPTLS(leaf.keyfile, leaf.certfile, ca.ca_certs, cert_reqs=7)


@pytest.mark.asyncio
async def test_mutual_tls_between_router_decode_and_prefill_pods(tiny_checkpoints: dict, tmp_path) -> None:
    ca, other = TestCA(tmp_path), TestCA(tmp_path, "another CA")
    pod_cert = ca.issue("pod", dns=(POD_NAME,), ips=())
    router_cert, stranger = ca.issue("router"), other.issue("stranger", dns=(POD_NAME,), ips=())
    pod_tls = GrpcTLS(pod_cert.certfile, pod_cert.keyfile, ca.ca_certs, server_name=POD_NAME)
    router_tls = GrpcTLS(router_cert.certfile, router_cert.keyfile, ca.ca_certs, server_name=POD_NAME)
    cluster = Cluster(tiny_checkpoints["llama"])
    async with grpc_pods(cluster, credentials=pod_tls.server_credentials()) as pods:
        for role, (port, _core) in pods.items():
            address = f"127.0.0.1:{port}"
            client = PodClient(address, tls=router_tls)
            assert (await client.get_load()).role == role.value
            await client.close()
            refused = [
                PodClient(address),  # plaintext
                PodClient(address, tls=GrpcTLS(router_cert.certfile, router_cert.keyfile, ca.ca_certs)),  # name
                PodClient(address, tls=GrpcTLS(stranger.certfile, stranger.keyfile, ca.ca_certs,
                                               server_name=POD_NAME)),  # a client certificate of another CA
                PodClient(address, channel=grpc.aio.secure_channel(  # no client certificate at all
                    address, grpc.ssl_channel_credentials(root_certificates=open(ca.ca_certs, "rb").read()),
                    options=pod_tls.channel_options())),
            ]
            for bad in refused:
                with pytest.raises(PodCallError) as info:
                    await bad.get_load(timeout=3.0)
                assert info.value.code is grpc.StatusCode.UNAVAILABLE
                await bad.close()
        # A decode pod reaches a prefill pod's handshake with its own certificate.
        prefill = f"127.0.0.1:{pods[Role.PREFILL][0]}"
        peer = GrpcPeerClient(timeout_s=3.0, tls=pod_tls)
        metadata = await peer.get_transfer_metadata(prefill)
        assert metadata.agent_name == pods[Role.PREFILL][1].config.transfer_agent_name
        await peer.close()
        plain = GrpcPeerClient(timeout_s=3.0)
        with pytest.raises(PeerUnreachableError):
            await plain.get_transfer_metadata(prefill)
        await plain.close()
    await cluster.close()
