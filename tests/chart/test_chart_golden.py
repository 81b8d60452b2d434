"""Golden renders of every profile (tests/chart/golden/) and the plain
manifests for kubectl users (manifests/) stay equal to a fresh render.

Regenerate both after a chart change with
``SPLITSERVE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/chart/test_chart_golden.py``
and review the diff."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import chart_support as cs

HEADER = ("# Generated from helm/splitserve by tests/chart/test_chart_golden.py ({what}).\n"
          "# Do not edit: change the chart, then run\n"
          "#   SPLITSERVE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/chart/test_chart_golden.py\n")
CPU = ("values-cpu.yaml",)
KEDA_ON = (("prefill.autoscaling.enabled", "true"), ("decode.autoscaling.enabled", "true"))


def _dashboard_json(text: str) -> str:
    (configmap,) = [d for d in yaml.safe_load_all(text) if d]
    return json.dumps(json.loads(configmap["data"]["splitserve.json"]), indent=2) + "\n"


@dataclass(frozen=True)
class Rendered:
    """One checked-in file and how it is rendered."""

    path: Path
    options: cs.Options
    what: str
    transform: Callable[[str], str] | None = None

    def expected(self) -> str:
        text = cs.render_text(self.options)
        if self.transform:
            return self.transform(text)
        return HEADER.format(what=self.what) + text


def _cpu(sets: tuple[tuple[str, str], ...] = (), show: tuple[str, ...] = ()) -> cs.Options:
    return cs.Options(values=CPU, sets=sets, show_only=show, skip_tests=True)


FILES = (
    *(Rendered(cs.GOLDEN / f"{p}.yaml", cs.Options(values=(f"values-{p}.yaml",)),
               f"golden render: helm template {cs.RELEASE} helm/splitserve -f values-{p}.yaml "
               f"--namespace {cs.NAMESPACE}") for p in cs.PROFILES),
    Rendered(cs.MANIFESTS / "splitserve.yaml", _cpu(),
             f"helm template {cs.RELEASE} helm/splitserve -f values-cpu.yaml --namespace {cs.NAMESPACE} --skip-tests"),
    Rendered(cs.MANIFESTS / "keda" / "scaledobjects-external.yaml",
             _cpu(KEDA_ON, ("templates/pool-scaledobjects.yaml",)),
             "CPU profile, KEDA on, trigger external-push on the router's scaler"),
    Rendered(cs.MANIFESTS / "keda" / "scaledobjects-prometheus.yaml",
             _cpu((*KEDA_ON, ("prefill.autoscaling.trigger", "prometheus"), ("decode.autoscaling.trigger", "prometheus")),
                  ("templates/pool-scaledobjects.yaml",)),
             "CPU profile, KEDA on, trigger prometheus"),
    Rendered(cs.MANIFESTS / "monitoring" / "prometheusrule.yaml",
             _cpu((("monitoring.enabled", "true"),), ("templates/monitoring-prometheusrule.yaml",)),
             "CPU profile, monitoring on: the PrometheusRule"),
    Rendered(cs.MANIFESTS / "monitoring" / "monitors.yaml",
             _cpu((("monitoring.enabled", "true"),),
                  ("templates/monitoring-servicemonitor.yaml", "templates/monitoring-podmonitor.yaml")),
             "CPU profile, monitoring on: ServiceMonitor (router) and PodMonitor (engine pods)"),
    Rendered(cs.MANIFESTS / "monitoring" / "dashboard.json",
             _cpu((("monitoring.enabled", "true"),), ("templates/monitoring-dashboard.yaml",)),
             "the Grafana dashboard", _dashboard_json),
)


@pytest.mark.parametrize("rendered", FILES, ids=[str(f.path.relative_to(cs.REPO)) for f in FILES])
def test_checked_in_render_is_fresh(rendered: Rendered) -> None:
    expected = rendered.expected()
    if cs.update_requested():
        rendered.path.parent.mkdir(parents=True, exist_ok=True)
        rendered.path.write_text(expected)
    assert rendered.path.exists(), f"{rendered.path} missing: run with {cs.UPDATE_ENV}=1"
    assert rendered.path.read_text() == expected, (
        f"{rendered.path.relative_to(cs.REPO)} is stale: run {cs.UPDATE_ENV}=1 .venv/bin/pytest "
        "tests/chart/test_chart_golden.py and review the diff")


def test_manifests_are_schema_valid() -> None:
    """What kubectl users apply is valid for 1.37 (CRs included)."""
    for path in sorted(p for p in cs.MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml"):
        for doc in (d for d in yaml.safe_load_all(path.read_text()) if d):
            assert cs.validation_errors(doc) == [], (path.name, doc["kind"], doc["metadata"]["name"])


def test_plain_manifests_have_no_test_hook() -> None:
    """`kubectl apply` would run a helm test pod at once: the plain manifests leave it out."""
    docs = [d for d in yaml.safe_load_all((cs.MANIFESTS / "splitserve.yaml").read_text()) if d]
    assert not [d for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})]
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "Role"}
