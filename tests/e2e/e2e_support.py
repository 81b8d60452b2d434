"""Shared helpers of the e2e tests (no tests here): a ``splitserve up``
cluster per module (in-process, or the real CLI as a child process), pod
metrics and load, the leak check, and the transformers reference."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
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


class UpProcess:
    """``splitserve up`` as a child process (the real CLI), driven through the
    real ``splitserve scale|rollout|status`` commands on its state dir."""

    def __init__(self, model: Path, tmp: Path, *, prefill: int = 1, decode: int = 1,
                 pod_args: Sequence[str] = (), router_args: Sequence[str] = (),
                 up_args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.model = model
        self.env = {**os.environ, **(env or {})}  # the up and every process it starts
        self.port = free_port()
        self.state_dir = tmp / "state"
        self.log_dir = tmp / "logs"
        self.stdout_path = tmp / "up.out"
        self.stderr_path = tmp / "up.err"
        self.argv = [sys.executable, "-m", "splitserve", "up", "--model", str(model), "--port", str(self.port),
                     "--prefill", str(prefill), "--decode", str(decode), "--state-dir", str(self.state_dir),
                     "--log-dir", str(self.log_dir), *up_args, *(f"--router-arg={a}" for a in router_args),
                     "--", *pod_args]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 240.0) -> None:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=err, start_new_session=True,
                                            env=self.env)
        deadline = time.monotonic() + timeout
        while "OpenAI base URL" not in self.stdout_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"splitserve up did not come up:\n{self.stderr_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def cli(self, *args: str, timeout: float = 300.0) -> str:
        """Run ``splitserve ARGS --state-dir <ours>``; its stdout (fails on a non-zero exit)."""
        done = subprocess.run([sys.executable, "-m", "splitserve", *args, "--state-dir", str(self.state_dir)],
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"splitserve {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json", timeout=30))

    def control(self) -> Any:
        """A ``ControlClient`` of the up's control endpoint (no CLI start-up: for steps that must be quick)."""
        from splitserve.local.control_client import ControlClient
        from splitserve.local.state_dir import ControlInfo

        info = ControlInfo.read(self.state_dir)
        assert info is not None, "the up wrote no control.json"
        return ControlClient(info.url)

    def pods(self, role: str | None = None) -> list[dict[str, Any]]:
        pools = self.status()["pools"]
        return [pod for name, pool in pools.items() if role in (None, name) for pod in pool["pods"]]

    def events(self) -> str:
        """What ``up`` logged about its pods (starting, ready, draining, exits)."""
        return self.stderr_path.read_text()

    def stop(self, timeout: float = 60.0) -> int | None:
        """Ctrl-C the up and wait; its exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()


def wait_pods_clean(pods: Sequence[dict[str, Any]], timeout: float = 30.0) -> dict[str, tuple[float, ...]]:
    """Poll every pod (``splitserve status`` entries) until none holds a KV
    block or a lease, over both /metrics (kv_blocks_leased, kv_cache_usage_perc)
    and GetLoad (free == total, leased 0); returns the last readings by pod
    name as (leased, usage, used blocks, leased blocks, running + waiting)."""
    deadline = time.monotonic() + timeout
    while True:
        readings: dict[str, tuple[float, ...]] = {}
        for pod in pods:
            leased = metric_total(pod["http_port"], "splitserve:kv_blocks_leased")
            usage = metric_total(pod["http_port"], "splitserve:kv_cache_usage_perc")
            load = asyncio.run(pod_load(pod["address"]))
            readings[pod["name"]] = (leased, usage, load.num_used_blocks, load.num_leased_blocks,
                                     load.load.num_requests)
        if all(not any(r) for r in readings.values()) or time.monotonic() > deadline:
            return readings
        time.sleep(0.3)


async def pod_load(address: str) -> LoadSnapshot:
    """One GetLoad of the pod at ``address``."""
    client = PodClient(address)
    try:
        return await client.get_load(timeout=5)
    finally:
        await client.close()
