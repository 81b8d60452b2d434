"""An engine pod's own settings (the engine's are ``EngineArgs``), validated once."""
from __future__ import annotations

from dataclasses import dataclass

from splitserve.grpc_tls import GrpcTLS
from splitserve.pod.messages import Role


@dataclass(frozen=True)
class PodConfig:
    """``advertise_address`` is the host:port decoders dial back (ClaimKV,
    ReleaseKV, handshake); default ``host:port``. ``kv_transfer_timeout_s``
    (a decoder's READ timeout) must stay below ``kv_claim_timeout_s`` (how
    long a prefill pod keeps a claimed lease), so an expired claimed lease is
    never still being read. ``grpc_tls``: TLS (mutual with a CA) on this
    pod's gRPC server and on its calls to prefill pods; None: plaintext."""

    role: Role
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = 8081
    advertise_address: str | None = None
    agent_name: str | None = None
    kv_lease_seconds: float = 30.0
    kv_claim_timeout_s: float = 60.0
    kv_transfer_timeout_s: float = 30.0
    ucx_tls: str | None = None
    nixl_progress_thread: bool = False
    shutdown_grace_seconds: float = 30.0
    grpc_tls: GrpcTLS | None = None

    def __post_init__(self) -> None:
        if self.kv_lease_seconds <= 0:
            raise ValueError(f"--kv-lease-seconds must be > 0, got {self.kv_lease_seconds}")
        if self.kv_transfer_timeout_s <= 0:
            raise ValueError(f"--kv-transfer-timeout must be > 0, got {self.kv_transfer_timeout_s}")
        if self.kv_transfer_timeout_s >= self.kv_claim_timeout_s:
            raise ValueError(
                f"--kv-transfer-timeout ({self.kv_transfer_timeout_s}s) must be below --kv-claim-timeout "
                f"({self.kv_claim_timeout_s}s): a claimed lease may only expire after the READ gave up"
            )
        if self.shutdown_grace_seconds < 0:
            raise ValueError(f"--shutdown-grace-seconds must be >= 0, got {self.shutdown_grace_seconds}")
        for name in ("port", "http_port"):
            value = getattr(self, name)
            if not 0 <= value < 65536:
                raise ValueError(f"--{name.replace('_', '-')} must be a TCP port, got {value}")

    @property
    def address(self) -> str:
        return self.advertise_address or f"{self.host}:{self.port}"

    @property
    def transfer_agent_name(self) -> str:
        """Stable per pod (restarts differ by incarnation id, not by name)."""
        return self.agent_name or f"{self.role.value}@{self.address}"
