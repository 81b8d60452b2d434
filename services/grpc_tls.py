"""TLS, optionally mutual, on the control-plane gRPC (router -> pods, decode -> prefill).

One setting per process, the same flags on both sides: a pod serves its gRPC
with its certificate and, given a CA bundle, requires and verifies a client
certificate signed by it (mutual TLS); the router, and a decode pod dialling
a prefill pod, present their own certificate and verify the pod's with that
CA. Off (plaintext) unless the flags are given.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class GrpcTLS:
    """``certfile``/``keyfile``: this process's PEM certificate chain and key.
    ``ca_certs``: the PEM bundle that signs the other side's certificates; on
    a server it turns on client-certificate verification (mutual TLS); on a
    client, None means the system roots. ``server_name``: the name a client
    checks in a pod's certificate instead of the dialled host (pods' IPs
    change; one certificate can name them all)."""

    certfile: str
    keyfile: str
    ca_certs: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        for flag, path in (("--grpc-ssl-certfile", self.certfile), ("--grpc-ssl-keyfile", self.keyfile),
                           ("--grpc-ssl-ca-certs", self.ca_certs)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        ca = Path(self.ca_certs).read_bytes() if self.ca_certs else None
        return Path(self.certfile).read_bytes(), Path(self.keyfile).read_bytes(), ca

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def channel_options(self) -> tuple[tuple[str, Any], ...]:
        return (("grpc.ssl_target_name_override", self.server_name),) if self.server_name else ()


def aio_channel(address: str, tls: GrpcTLS | None,
                options: tuple[tuple[str, Any], ...] = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address``: TLS when ``tls`` is set, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options + tls.channel_options())


def add_port(server: grpc.aio.Server, address: str, tls: GrpcTLS | None) -> int:
    """Bind ``address`` on ``server`` (TLS when ``tls``); the port, 0 if it failed."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


def add_grpc_tls_args(parser: argparse.ArgumentParser, side: str) -> None:
    """The ``--grpc-ssl-*`` flags; ``side`` says in the help whom they secure."""
    group = parser.add_argument_group(f"TLS on gRPC ({side})")
    group.add_argument("--grpc-ssl-certfile", default=None, metavar="PEM",
                       help="this process's certificate chain for gRPC (with --grpc-ssl-keyfile turns TLS on)")
    group.add_argument("--grpc-ssl-keyfile", default=None, metavar="PEM", help="its private key")
    group.add_argument("--grpc-ssl-ca-certs", default=None, metavar="PEM",
                       help="CA bundle of the other side's certificates: a pod then requires client "
                            "certificates (mutual TLS); a client verifies pods with it")
    group.add_argument("--grpc-ssl-server-name", default=None, metavar="NAME",
                       help="name to check in pods' certificates instead of their address")


def grpc_tls_from_args(args: argparse.Namespace) -> GrpcTLS | None:
    """The ``GrpcTLS`` the flags ask for, None when TLS is off; ``ValueError``
    when they are incomplete."""
    cert, key = args.grpc_ssl_certfile, args.grpc_ssl_keyfile
    if cert is None and key is None:
        if args.grpc_ssl_ca_certs or args.grpc_ssl_server_name:
            raise ValueError("--grpc-ssl-ca-certs/--grpc-ssl-server-name need --grpc-ssl-certfile and "
                             "--grpc-ssl-keyfile")
        return None
    if cert is None or key is None:
        raise ValueError("give both --grpc-ssl-certfile and --grpc-ssl-keyfile")
    return GrpcTLS(cert, key, args.grpc_ssl_ca_certs, args.grpc_ssl_server_name)
