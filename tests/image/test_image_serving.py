"""Router + prefill + decode as three hardened containers, run the way the
Helm chart runs them (read-only root, uid 1000, no capabilities, no
privilege gain, tmpfs /tmp and /dev/shm, the API key from the environment),
on the host network's loopback ports.

Greedy chat and completion answers through the containers' router equal
those of ``splitserve up`` in the host venv on the host's own tiny model
(test_image_contents checks it is the same checkpoint). The host run loads
the same portable kernel build as the image (built here into a temporary
cache dir) so both run the same code. Then: a 401 without the key, KV moved
between the containers with nothing left held, the prebuilt kernels used, and
each container leaving 0 on SIGTERM within its grace period.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from image_support import Container, metric_total, post_json, post_stream, wait_healthy
from splitserve.local.launcher import LocalCluster, LocalClusterConfig, free_port
from splitserve.router.pd_client import LoadSnapshot, PodClient

pytestmark = pytest.mark.image

SERVED = "tiny"
GRACE_SECONDS = 10  # --shutdown-grace-seconds of every process
STOP_TIMEOUT = 25  # podman/docker stop -t: the pod's terminationGracePeriodSeconds
ENGINE_ARGS = ["--kv-cache-memory", str(64 << 20), "--max-model-len", "2048"]
_LONG = ("Disaggregated serving splits the prompt's prefill from the token by token decode, so each pool "
         "scales on its own; the decode pod pulls the prompt's KV blocks from the prefill pod over NIXL. ")
# The long ones pass the router's 64-token threshold, so their KV moves from prefill to decode.
CHATS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": _LONG * 2}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": _LONG + "What does the router do?"}],
]
PROMPTS = ["The capital of France is", _LONG * 3, "1, 2, 3,"]


def _requests() -> list[tuple[str, dict[str, Any]]]:
    sampling = {"model": SERVED, "temperature": 0, "max_tokens": 24, "ignore_eos": True}
    out = [("/chat/completions", {**sampling, "messages": m}) for m in CHATS]
    out += [("/completions", {**sampling, "prompt": p, "logprobs": 2}) for p in PROMPTS]
    return out


def _answers(base_url: str, api_key: str) -> list[dict[str, Any]]:
    answers = []
    for path, body in _requests():
        status, answer = post_json(base_url, path, body, api_key)
        assert status == 200, answer
        answers.append({k: v for k, v in answer.items() if k not in ("id", "created", "system_fingerprint")})
    events = post_stream(base_url, "/chat/completions", _requests()[1][1], api_key)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    answers.append({"stream": text, "finish": [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]})
    return answers


@pytest.fixture(scope="module")
def api_key() -> str:
    return secrets.token_hex(16)


@pytest.fixture(scope="module")
def reference(api_key: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The answers of ``splitserve up`` in this venv (stopped before the containers start)."""
    from splitserve.cli import main as cli_main

    model = tmp_path_factory.mktemp("host") / "tiny"
    assert cli_main(["model", "tiny", "--out", str(model)]) == 0
    env = {"SPLITSERVE_API_KEY": api_key}
    if shutil.which("cc"):
        from splitserve.kernels.cpu_library import build_portable

        cache = tmp_path_factory.mktemp("host-kernels")
        build_portable(cache)
        env["SPLITSERVE_CACHE_DIR"] = str(cache)
    config = LocalClusterConfig(model=str(model), port=free_port(), engine_args=list(ENGINE_ARGS),
                                router_args=["--served-model-name", SERVED], ready_timeout_seconds=240,
                                log_dir=tmp_path_factory.mktemp("host-logs"))
    cluster = LocalCluster(config)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cluster.start()
        return _answers(cluster.base_url, api_key)
    finally:
        cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class ContainerCluster:
    router: Container
    prefill: Container
    decode: Container
    router_port: int
    grpc_ports: dict[str, int]
    http_ports: dict[str, int]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}/v1"


def _pod_args(role: str, grpc_port: int, http_port: int) -> list[str]:
    return ["serve", role, "--model", "/models/tiny", "--host", "127.0.0.1", "--port", str(grpc_port),
            "--http-port", str(http_port), "--advertise-address", f"127.0.0.1:{grpc_port}",
            "--agent-name", f"{role}-0", "--kv-lease-seconds", "30",
            "--shutdown-grace-seconds", str(GRACE_SECONDS), *ENGINE_ARGS]


@pytest.fixture(scope="module")
def cluster(engine: list[str], image: str, api_key: str, log_dir: Path,
            reference: list[dict[str, Any]]) -> Iterator[ContainerCluster]:
    tag = f"splitserve-test-{os.getpid()}"
    grpc = {role: free_port() for role in ("prefill", "decode")}
    http = {role: free_port() for role in ("prefill", "decode")}
    pods = {role: Container(engine, f"{tag}-{role}", log_dir) for role in ("prefill", "decode")}
    router = Container(engine, f"{tag}-router", log_dir)
    router_port = free_port()
    try:
        for role, pod in pods.items():
            pod.run(image, _pod_args(role, grpc[role], http[role]))
        for role, pod in pods.items():
            wait_healthy(http[role], list(pods.values()))
        router.run(image, ["router", "--model", "/models/tiny", "--served-model-name", SERVED,
                           "--host", "127.0.0.1", "--port", str(router_port),
                           "--prefill", f"127.0.0.1:{grpc['prefill']}", "--decode", f"127.0.0.1:{grpc['decode']}",
                           "--shutdown-grace-seconds", str(GRACE_SECONDS)],
                   env_names=("SPLITSERVE_API_KEY",), env={**os.environ, "SPLITSERVE_API_KEY": api_key})
        wait_healthy(router_port, [router, *pods.values()])
        yield ContainerCluster(router, pods["prefill"], pods["decode"], router_port, grpc, http)
    finally:
        for container in (router, *pods.values()):
            container.remove()


def _loads(cluster: ContainerCluster) -> dict[str, LoadSnapshot]:
    async def poll() -> dict[str, LoadSnapshot]:
        out = {}
        for role, port in cluster.grpc_ports.items():
            client = PodClient(f"127.0.0.1:{port}")
            try:
                out[role] = await client.get_load(timeout=5)
            finally:
                await client.close()
        return out

    return asyncio.run(poll())


def _wait_idle(cluster: ContainerCluster, timeout: float = 40.0) -> dict[str, LoadSnapshot]:
    """GetLoad of both pods once nothing is used or leased (or the last one at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        loads = _loads(cluster)
        if all(s.num_used_blocks == 0 and s.num_leased_blocks == 0 for s in loads.values()):
            return loads
        if time.monotonic() > deadline:
            return loads
        time.sleep(0.5)


def test_answers_equal_splitserve_up(cluster: ContainerCluster, api_key: str,
                                     reference: list[dict[str, Any]]) -> None:
    got = _answers(cluster.base_url, api_key)
    assert len(got) == len(reference)
    for answer, expected in zip(got, reference):
        if "stream" in answer:
            assert answer == expected
        else:
            _assert_same(answer, expected)
    assert any(a["choices"][0].get("text") or a["choices"][0].get("message", {}).get("content")
               for a in got if "choices" in a), "every answer is empty: the comparison shows nothing"


def _assert_same(answer: dict[str, Any], expected: dict[str, Any]) -> None:
    """Equal, with logprobs compared to 1e-4 (same code and kernels, but not asserted bit-exact)."""
    def strip(a: dict[str, Any]) -> dict[str, Any]:
        choices = [{k: v for k, v in c.items() if k != "logprobs"} for c in a["choices"]]
        return {**a, "choices": choices}

    assert strip(answer) == strip(expected)
    for got_choice, want_choice in zip(answer["choices"], expected["choices"]):
        got_lp, want_lp = got_choice.get("logprobs"), want_choice.get("logprobs")
        if want_lp is None or got_lp is None:
            assert got_lp == want_lp
            continue
        assert got_lp["tokens"] == want_lp["tokens"]
        assert got_lp["token_logprobs"] == pytest.approx(want_lp["token_logprobs"], abs=1e-4)


def test_no_or_a_wrong_key_is_401(cluster: ContainerCluster, api_key: str) -> None:
    body = {"model": SERVED, "prompt": "Hi", "max_tokens": 2}
    for key in (None, api_key[::-1]):
        status, answer = post_json(cluster.base_url, "/completions", body, key)
        assert status == 401, answer
    assert post_json(cluster.base_url, "/completions", body, api_key)[0] == 200


def test_kv_moved_between_containers_and_nothing_is_held(cluster: ContainerCluster) -> None:
    decode_http = cluster.http_ports["decode"]
    assert metric_total(decode_http, "splitserve:kv_transfer_bytes_total") > 0
    assert metric_total(decode_http, "splitserve:kv_transfer_failures_total") == 0
    loads = _wait_idle(cluster)
    for role, load in loads.items():
        assert (load.num_leased_blocks, load.num_used_blocks) == (0, 0), (role, load)
        assert load.load.free_blocks == load.load.total_blocks > 0
    for role, port in cluster.http_ports.items():
        assert metric_total(port, "splitserve:kv_blocks_leased") == 0, role
        assert metric_total(port, "splitserve:kv_cache_usage_perc") == 0, role


def test_pods_use_the_prebuilt_kernels(cluster: ContainerCluster) -> None:
    for pod in (cluster.prefill, cluster.decode):
        logs = pod.logs()
        assert "unavailable" not in logs and "Traceback" not in logs, logs[-3000:]
        assert "cpu attention" in logs, logs[-3000:]  # the model runner names its attention backend


def test_sigterm_each_exits_0_within_its_grace(cluster: ContainerCluster) -> None:
    # Router first, then the pools, as a rollout would drain them.
    for container in (cluster.router, cluster.decode, cluster.prefill):
        container.stop(STOP_TIMEOUT)  # SIGTERM; SIGKILL (exit 137) only past the grace period
        state = container.state()
        assert not state["Running"]
        assert state["ExitCode"] == 0, f"{container.name} exited {state['ExitCode']}:\n{container.logs()[-3000:]}"
        assert "Traceback" not in container.logs()
