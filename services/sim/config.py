"""Settings of a simulated fleet (``splitserve serve sim``), validated once.

A fleet is one process serving groups of simulated pods (``PodGroup``: a
role and a count). Pod ``i`` of the process (groups in order) listens for
gRPC on ``base_port + i`` (``base_port`` 0: an ephemeral port each, kept
across restarts); pods added at run time take the next indexes.
One HTTP port serves every pod's ``/health`` and ``/metrics`` plus the
fleet's control API (``control_http.py``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from splitserve.kvtransfer.layout import KVCacheLayout
from splitserve.pod.messages import Role
from splitserve.sim.faults import FaultConfig
from splitserve.sim.latency_model import LatencyParams


@dataclass(frozen=True)
class PodGroup:
    role: Role
    count: int

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"--num-pods must be >= 0, got {self.count} for {self.role.value}")


@dataclass(frozen=True)
class SimModel:
    """What a sim pod needs of a model: vocabulary, end tokens, context
    limit and the KV layout (for transfer bytes and the handshake).
    ``vocab_size`` is the tokenizer's (checkpoints pad the embedding past
    it), so every simulated token detokenizes."""

    vocab_size: int
    eos_token_ids: frozenset[int]
    max_position_embeddings: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    fingerprint: str

    def layout(self, num_blocks: int, block_size: int) -> KVCacheLayout:
        return KVCacheLayout(num_blocks, self.num_layers, block_size, self.num_kv_heads, self.head_dim, self.dtype)

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike[str], dtype: str = "float32") -> SimModel:
        """``config.json`` (and generation config) of a Hugging Face folder;
        raises ``FileNotFoundError`` / ``UnsupportedModelError``."""
        from splitserve.engine.model_config import ModelConfig
        from splitserve.engine.tokenizer import eos_token_ids
        from splitserve.pod.model_fingerprint import model_fingerprint

        config = ModelConfig.from_pretrained(model_dir)
        vocab = min(config.vocab_size, _tokenizer_size(Path(model_dir)) or config.vocab_size)
        return cls(vocab, eos_token_ids(model_dir), config.max_position_embeddings,
                   config.num_layers, config.num_kv_heads, config.head_dim, dtype,
                   "sim:" + model_fingerprint(model_dir, dtype))

    @classmethod
    def tiny(cls) -> SimModel:
        """The built-in tiny Llama's shape (``splitserve model tiny``)."""
        from splitserve.engine.tiny_model import END_OF_TEXT, IM_END, TinyModelSpec, tokenizer_vocab

        spec = TinyModelSpec()
        vocab = tokenizer_vocab()
        return cls(len(vocab), frozenset({vocab[END_OF_TEXT], vocab[IM_END]}), spec.max_position_embeddings,
                   spec.num_hidden_layers, spec.num_key_value_heads, spec.head_dim, "float32", "sim:tiny")


@dataclass(frozen=True)
class SimConfig:
    """Everything one sim process serves. ``advertise_host`` is the host
    peers and routers dial (default ``host``; ``0.0.0.0`` advertises
    127.0.0.1). ``discovery_file``: keep a file-discovery JSON of the pods
    (the runtime contract's format) up to date there."""

    groups: tuple[PodGroup, ...]
    model: SimModel
    host: str = "127.0.0.1"
    base_port: int = 50051
    http_port: int = 8081
    advertise_host: str | None = None
    block_size: int = 16
    num_blocks: int = 2048
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    kv_lease_seconds: float = 30.0
    kv_claim_timeout_s: float = 60.0
    kv_transfer_timeout_s: float = 30.0
    shutdown_grace_seconds: float = 30.0
    latency: LatencyParams = field(default_factory=LatencyParams)
    faults: FaultConfig = field(default_factory=FaultConfig)
    slow_pods: int = 0
    slow_factor: float = 4.0
    seed: int = 0
    discovery_file: str | None = None
    max_pods: int = 4096

    def __post_init__(self) -> None:
        if not self.groups or not any(g.count for g in self.groups):
            raise ValueError("a sim fleet needs at least one pod: --sim-role ROLE --num-pods N")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"--block-size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        for name in ("num_blocks", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.base_port < 65536 or self.base_port + self.total_pods > 65536:
            raise ValueError(f"--base-port {self.base_port} leaves no room for {self.total_pods} pods below 65536 "
                             "(0: ephemeral ports)")
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"--http-port must be a TCP port, got {self.http_port}")
        if self.total_pods > self.max_pods:
            raise ValueError(f"{self.total_pods} pods exceed the limit of {self.max_pods}")
        if not 0 <= self.slow_pods <= self.total_pods or self.slow_factor <= 0:
            raise ValueError("--slow-pods must be in [0, number of pods] and --slow-factor > 0")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"--max-model-len must be >= 1, got {self.max_model_len}")
        if self.kv_transfer_timeout_s >= self.kv_claim_timeout_s:
            raise ValueError("--kv-transfer-timeout must be below --kv-claim-timeout")

    @property
    def total_pods(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def dial_host(self) -> str:
        host = self.advertise_host or self.host
        return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

    @property
    def resolved_max_model_len(self) -> int:
        return self.max_model_len or self.model.max_position_embeddings


def _tokenizer_size(model_dir: Path) -> int | None:
    """Entries of ``tokenizer.json`` (vocabulary plus added tokens), if any."""
    path = model_dir / "tokenizer.json"
    try:
        data = json.loads(path.read_text())
        ids = set(data["model"]["vocab"].values()) | {t["id"] for t in data.get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return max(ids) + 1 if ids else None
