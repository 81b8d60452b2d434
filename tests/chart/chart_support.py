"""Shared helpers of the chart tests (no tests here): run helm offline, parse
its output, validate every rendered object, and the option matrix.

No cluster runs here: ``helm template`` renders the chart, core objects are
validated with ``kubernetes-validate`` (strict, Kubernetes 1.37.0) and custom
resources with ``jsonschema`` against the copies in ``schemas/``. A kind with
neither schema is an error, never skipped.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "splitserve"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
GOLDEN = Path(__file__).resolve().parent / "golden"
MANIFESTS = REPO / "manifests"
KUBE_VERSION = "1.37.0"
RELEASE = "splitserve"
NAMESPACE = "splitserve"
PROFILES = ("cpu", "gpu", "unified")
UPDATE_ENV = "SPLITSERVE_UPDATE_GOLDEN"

# Custom resources the chart may render -> schema file under schemas/.
CR_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh/scaledobject_v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com/servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com/podmonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com/prometheusrule_v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "gateway.networking.k8s.io/httproute_v1.json",
}


def tool(name: str) -> str:
    """Path of ``helm``/``kubectl``: the venv's (scripts/install_k8s_tools.py), else PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: run `make install` or `python scripts/install_k8s_tools.py`")
    return found


def update_requested() -> bool:
    return os.environ.get(UPDATE_ENV, "") not in ("", "0")


def profile_values(profile: str) -> Path:
    return CHART / f"values-{profile}.yaml"


@dataclass(frozen=True)
class Options:
    """One ``helm template`` invocation: values files, ``--set`` pairs
    (helm types them: ints, bools, else strings) and ``--set-json`` pairs
    (for floats and nulls)."""

    values: tuple[str, ...] = ()
    sets: tuple[tuple[str, str], ...] = ()
    json_sets: tuple[tuple[str, str], ...] = ()
    show_only: tuple[str, ...] = ()
    skip_tests: bool = False

    def args(self) -> list[str]:
        out: list[str] = []
        for path in self.values:
            out += ["-f", str(CHART / path)]
        for key, value in self.sets:
            out += ["--set", f"{key}={value}"]
        for key, value in self.json_sets:
            out += ["--set-json", f"{key}={value}"]
        for template in self.show_only:
            out += ["--show-only", template]
        if self.skip_tests:
            out.append("--skip-tests")
        return out


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=60, check=False)


@functools.cache
def render_text(options: Options = Options()) -> str:
    """``helm template`` output; raises with helm's message when it fails."""
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                  "--kube-version", KUBE_VERSION, *options.args())
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return result.stdout


class RenderError(Exception):
    """helm template (or lint) exited non-zero; the message is helm's stderr."""


@functools.cache
def _parsed(options: Options) -> tuple[dict[str, Any], ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(doc for doc in yaml.load_all(render_text(options), Loader=loader) if doc)


def render(options: Options = Options()) -> list[dict[str, Any]]:
    """The rendered objects (parsed once per option set: treat them as read-only)."""
    return list(_parsed(options))


def render_fails(*sets: tuple[str, str], values: tuple[str, ...] = ()) -> str:
    """Render options that must be refused; return helm's error text."""
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION,
                  *Options(values=values, sets=tuple(sets)).args())
    if result.returncode == 0:
        raise AssertionError(f"helm template accepted {sets!r}")
    return result.stderr


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise KeyError(f"no {kind}/{name} in the render")


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(object name, pod spec) of every Deployment and bare Pod."""
    out = []
    for doc in docs:
        if doc["kind"] == "Deployment":
            out.append((doc["metadata"]["name"], doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "Pod":
            out.append((doc["metadata"]["name"], doc["spec"]))
    return out


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


@functools.cache
def _cr_validator(path: str) -> Any:
    import jsonschema

    schema = json.loads((SCHEMAS / path).read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


class SchemaMissing(Exception):
    """A rendered kind has no schema (neither kubernetes-validate nor schemas/)."""


@functools.cache
def _core_validator(api_version: str, kind: str) -> Any:
    """kubernetes-validate's strict 1.37.0 schema for one kind, built once.

    The same files and validator class as ``kubernetes_validate.validate(doc,
    "1.37.0", strict=True)``, which re-reads its 1.8 MB definitions file on
    every call; cached here so the render matrix stays fast.
    """
    import re

    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Resource

    schema_dir = f"kubernetes-json-schema/v{KUBE_VERSION}-local-strict"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = schema_contents(f"{schema_dir}/{kind.lower()}-{group_version}.json", KUBE_VERSION)
    except FileNotFoundError:
        raise SchemaMissing(f"{api_version} {kind}: no schema in kubernetes-validate {KUBE_VERSION}") from None
    registry = Resource.from_contents(schema) @ _core_definitions()
    return jsonschema.Draft202012Validator(schema, registry=registry)


@functools.cache
def _core_definitions() -> Any:
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    definitions = schema_contents(f"kubernetes-json-schema/v{KUBE_VERSION}-local-strict/_definitions.json",
                                  KUBE_VERSION)
    return Resource.from_contents(definitions) @ Registry()


def validation_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema error of one rendered object (empty = valid); raises
    ``SchemaMissing`` for a kind with no schema."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CR_SCHEMAS:
        validator = _cr_validator(CR_SCHEMAS[key])
    else:
        validator = _core_validator(*key)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@dataclass(frozen=True)
class Case:
    """A named option set of the render matrix."""

    name: str
    options: Options = field(default_factory=Options)


def _s(*pairs: tuple[str, str], values: tuple[str, ...] = ()) -> Options:
    return Options(values=values, sets=tuple(pairs))


# Every profile, plus each option of the chart switched on its own.
MATRIX: tuple[Case, ...] = (
    *(Case(f"profile-{p}", Options(values=(f"values-{p}.yaml",))) for p in PROFILES),
    Case("defaults"),
    Case("keda-external", _s(("prefill.autoscaling.trigger", "external"))),
    Case("keda-prometheus", _s(("prefill.autoscaling.trigger", "prometheus"),
                               ("decode.autoscaling.trigger", "prometheus"))),
    Case("keda-off", _s(("prefill.autoscaling.enabled", "false"), ("decode.autoscaling.enabled", "false"))),
    Case("keda-idle-zero", _s(("decode.autoscaling.idleReplicaCount", "0"),
                              ("decode.autoscaling.behavior.scaleDown.stabilizationWindowSeconds", "600"))),
    Case("ingress", _s(("router.ingress.enabled", "true"))),
    Case("ingress-tls", _s(("router.ingress.enabled", "true"), ("router.ingress.tls[0].secretName", "tls"),
                           ("router.ingress.tls[0].hosts[0]", "splitserve.local"))),
    Case("httproute", _s(("router.httpRoute.enabled", "true"), ("router.httpRoute.hostnames[0]", "llm.example.com"))),
    Case("model-image", _s(("model.source", "image"))),
    Case("model-pvc", _s(("model.source", "pvc"), ("model.pvc.claimName", "models"),
                         ("model.pvc.subPath", "llama"), ("model.path", "/models/llama"))),
    Case("model-hostpath", _s(("model.source", "hostPath"), ("model.hostPath.path", "/data/models"),
                              ("model.path", "/models/llama"))),
    Case("model-hf", _s(("model.source", "hf"), ("model.hf.repo", "Qwen/Qwen2.5-0.5B-Instruct"),
                        ("model.path", "/models/qwen"), ("model.hf.tokenSecret.name", "hf-token"))),
    Case("monitoring-on", _s(("monitoring.enabled", "true"))),
    Case("monitoring-off", _s(("monitoring.enabled", "false"))),
    Case("networkpolicy-on", _s(("networkPolicy.enabled", "true"))),
    Case("networkpolicy-off", _s(("networkPolicy.enabled", "false"))),
    Case("networkpolicy-kv-range", _s(("networkPolicy.kvPortRange.start", "40000"),
                                      ("networkPolicy.kvPortRange.end", "40100"))),
    Case("apikey-existing", _s(("apiKey.existingSecret", "my-key"), ("apiKey.secretKey", "token"))),
    Case("apikey-created", _s(("apiKey.value", "test-key-not-secret"))),
    Case("apikey-off", _s(("apiKey.enabled", "false"))),
    Case("discovery-dns", _s(("router.discovery", "dns"))),
    Case("discovery-static", _s(("router.discovery", "static"), ("router.static.prefill[0]", "10.0.0.1:50051"),
                                ("router.static.decode[0]", "10.0.0.2:50051"))),
    Case("gpu-monitoring-prometheus", _s(("prefill.autoscaling.trigger", "prometheus"),
                                         values=("values-gpu.yaml",))),
    Case("unified-monitoring", _s(("monitoring.enabled", "true"), values=("values-unified.yaml",))),
    Case("grpc-tls", _s(("grpcTLS.enabled", "true"), ("grpcTLS.secretName", "splitserve-grpc-tls"))),
    Case("bind-all", _s(("bindAddress", "0.0.0.0"))),
    Case("router-tls", _s(("router.tls.enabled", "true"), ("router.tls.secretName", "router-cert"),
                          ("router.ingress.enabled", "true"), ("monitoring.enabled", "true"))),
)


def matrix_ids() -> list[str]:
    return [case.name for case in MATRIX]
