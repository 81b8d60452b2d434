"""Generate the control plane's Python stubs from ``proto/*.proto``.

Run by ``make proto`` (part of ``make install``); the generated ``*_pb2.py`` /
``*_pb2_grpc.py`` land next to the ``.proto`` files in ``proto/`` (importable as
``splitserve.proto.<name>_pb2``) and are git-ignored, never edited by hand.

protoc derives import statements from a file's path relative to its include
root, so each ``.proto`` is compiled from a staging tree laid out as
``splitserve/proto/<name>.proto``; the generated stubs then import each other as
``splitserve.proto.<name>_pb2``.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent


def build_stubs(proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile every ``.proto`` in ``proto_dir``; return the generated files."""
    import grpc_tools  # build-time dependency only

    sources = sorted(proto_dir.glob("*.proto"))
    if not sources:
        return []
    include = Path(grpc_tools.__file__).parent / "_proto"
    generated: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "splitserve" / "proto"
        staging.mkdir(parents=True)
        for source in sources:
            shutil.copy(source, staging / source.name)
        # protoc runs in its own process: in-process it shares the protobuf C
        # runtime with whatever the caller already loaded, which can crash.
        args = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{tmp}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[f"splitserve/proto/{s.name}" for s in sources],
        ]
        result = subprocess.run(args, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"protoc failed on {', '.join(s.name for s in sources)}: {result.stderr.strip()}"
            )
        for produced in staging.glob("*_pb2*.py*"):
            target = proto_dir / produced.name
            shutil.copy(produced, target)
            generated.append(target)
    return generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proto-dir", type=Path, default=PROTO_DIR)
    args = parser.parse_args(argv)
    for path in build_stubs(args.proto_dir):
        print(f"generated {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
