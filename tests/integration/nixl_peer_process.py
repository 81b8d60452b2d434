"""Test-side handle on a ``nixl_prefill_peer.py`` subprocess."""
from __future__ import annotations

import base64
import queue
import subprocess
import sys
import threading
from pathlib import Path

from splitserve.kvtransfer import TransferMetadata

SCRIPT = Path(__file__).with_name("nixl_prefill_peer.py")


class PeerProcess:
    """Starts the peer, reads its ``@@`` lines on a thread, kills it on ``stop``."""

    def __init__(self, agent_name: str, shape: tuple[int, ...], seed: int,
                 ucx_tls: str | None = None, max_seconds: float = 60.0) -> None:
        cmd = [sys.executable, str(SCRIPT), "--agent-name", agent_name, "--random",
               "--shape", ",".join(map(str, shape)), "--seed", str(seed),
               "--max-seconds", str(max_seconds)]
        if ucx_tls:
            cmd += ["--ucx-tls", ucx_tls]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.metadata = TransferMetadata.from_bytes(base64.b64decode(self.expect("METADATA", 30)[0]))

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            if line.startswith("@@"):
                self.lines.put(line[2:].strip())
        self.lines.put("EOF")

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, tag: str, timeout: float) -> list[str]:
        """Words after the next ``@@<tag>`` line; fails with the peer's output."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"peer sent no {tag} in {timeout}s; output:\n{''.join(self.log)}") from None
            if line == "EOF":
                raise RuntimeError(f"peer exited before {tag}; output:\n{''.join(self.log)}")
            words = line.split()
            if words[0] == tag:
                return words[1:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)
