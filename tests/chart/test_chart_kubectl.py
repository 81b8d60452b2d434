"""What kubectl users run works offline with the pinned kubectl 1.37:
`kubectl kustomize manifests` builds the plain manifests, and the
key-reading line of NOTES.txt reads a Secret shaped like the chart's."""
from __future__ import annotations

import base64
import re
import subprocess

import yaml

import chart_support as cs


def _kubectl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([cs.tool("kubectl"), *args], capture_output=True, text=True, timeout=60, check=False,
                          env={"KUBECONFIG": "/dev/null", "PATH": "/usr/bin:/bin"})


def _key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def test_kustomize_builds_the_plain_manifests() -> None:
    result = _kubectl("kustomize", str(cs.MANIFESTS))
    assert result.returncode == 0, result.stderr
    built = {_key(d): d for d in yaml.safe_load_all(result.stdout) if d}
    plain = {_key(d): d for d in yaml.safe_load_all((cs.MANIFESTS / "splitserve.yaml").read_text()) if d}
    assert built == plain


def test_notes_key_line_reads_the_secret() -> None:
    """The jsonpath NOTES prints, run by kubectl on a Secret with the chart's name and key
    (made locally with --dry-run=client: no API server here)."""
    result = cs.helm("install", cs.RELEASE, str(cs.CHART), "--dry-run=client", "--namespace", cs.NAMESPACE,
                     "--set", "apiKey.value=k-123")
    assert result.returncode == 0, result.stderr
    notes = result.stdout[result.stdout.index("NOTES:"):]
    (name, jsonpath) = re.findall(r"get secret (\S+) -o jsonpath='([^']+)'", notes)[0]
    (secret,) = cs.by_kind(cs.render(cs.Options(sets=(("apiKey.value", "k-123"),))), "Secret")
    assert secret["metadata"]["name"] == name
    (key,) = secret["data"]
    value = base64.b64decode(secret["data"][key]).decode()
    read = _kubectl("create", "secret", "generic", name, f"--from-literal={key}={value}",
                    "--dry-run=client", "-o", f"jsonpath={jsonpath}")
    assert read.returncode == 0, read.stderr
    assert base64.b64decode(read.stdout).decode() == "k-123"
