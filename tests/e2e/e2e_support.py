"""Shared helpers of the e2e tests (no tests here): a ``splitserve up``
cluster per module, pod metrics and load, and the transformers reference."""
from __future__ import annotations

import asyncio
import os
import re
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from splitserve.local.launcher import LocalCluster, LocalClusterConfig, free_port
from splitserve.router.pd_client import LoadSnapshot, PodClient

# Small KV caches keep three engines within a laptop's memory; the tiny model
# needs a few MB per thousand tokens.
KV_CACHE_ARGS = ["--kv-cache-memory", str(64 * 1024 * 1024)]


@contextmanager
def running_cluster(model: Path, *, prefill: int = 1, decode: int = 1, unified: int = 0,
                    max_model_len: int = 2048, router_args: Sequence[str] = (), env: dict[str, str] | None = None,
                    log_dir: Path | None = None) -> Iterator[LocalCluster]:
    """Start ``splitserve up``'s processes (``env`` set for them only) and stop them after."""
    config = LocalClusterConfig(model=str(model), num_prefill=prefill, num_decode=decode,
                                num_unified=unified, port=free_port(), engine_args=[*KV_CACHE_ARGS, "--max-model-len", str(max_model_len)],
                                router_args=list(router_args), log_dir=log_dir, ready_timeout_seconds=180)
    cluster = LocalCluster(config)
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        cluster.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        yield cluster
    finally:
        cluster.stop()


def metric_values(port: int, name: str, host: str = "127.0.0.1") -> dict[str, float]:
    """Samples of ``name`` on ``http://host:port/metrics``, keyed by their label text."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            out[match.group(1) or ""] = float(match.group(2))
    return out


def metric_total(port: int, name: str) -> float:
    return sum(metric_values(port, name).values())


def pod_metric(cluster: LocalCluster, name: str) -> dict[str, float]:
    """``name`` summed per pod (pod name -> value)."""
    return {pod.name: metric_total(pod.http_port, name) for pod in cluster.pods}


def pod_loads(cluster: LocalCluster) -> dict[str, LoadSnapshot]:
    async def poll() -> dict[str, LoadSnapshot]:
        out = {}
        for pod in cluster.pods:
            client = PodClient(f"{cluster.config.host}:{pod.grpc_port}")
            try:
                out[pod.name] = await client.get_load(timeout=5)
            finally:
                await client.close()
        return out

    return asyncio.run(poll())


def wait_until_idle(cluster: LocalCluster, timeout: float = 20.0) -> dict[str, LoadSnapshot]:
    """Poll every pod's GetLoad until no block is used or leased; return the last loads."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        loads = pod_loads(cluster)
        if all(s.num_used_blocks == 0 and s.num_leased_blocks == 0 and s.load.num_requests == 0
               for s in loads.values()) or time.monotonic() > deadline:
            return loads
        time.sleep(0.2)


class HFReference:
    """Greedy ``transformers`` generation on the same folder, chat template included."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        with self.torch.no_grad():
            out = self.model.generate(self.torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                                      do_sample=False)
        return out[0, len(prompt_ids):].tolist()

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def logprob(self, prompt_ids: list[int], token: int) -> float:
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor([prompt_ids])).logits[0, -1]
        return float(self.torch.log_softmax(logits.float(), dim=-1)[token])
