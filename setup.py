"""Build hook: generate the control plane's gRPC stubs from ``proto/*.proto``.

Every build — ``pip install .``, ``pip install -e .``, ``python -m build``
(sdist and wheel) — runs ``build_py``, which compiles the stubs into
``proto/`` (git-ignored) before the modules are collected, so no install
depends on ``make proto``. ``grpcio-tools`` is a build requirement only
(pyproject.toml ``[build-system]``); the runtime needs ``grpcio`` + ``protobuf``.
The metadata lives in pyproject.toml.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        # Loaded by path: the package is not importable while it is being built.
        spec = importlib.util.spec_from_file_location("_splitserve_stub_builder", ROOT / "proto" / "stub_builder.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        module.build_stubs(ROOT / "proto")
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
