"""Every metric an alert, a dashboard panel or a default KEDA Prometheus query
of the chart names is one that a running ``splitserve up`` (router, prefill
pod, decode pod on the tiny model) really exports, and histograms are only
used through their ``_bucket``/``_sum``/``_count`` series."""
from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import chart_support as cs

pytestmark = pytest.mark.e2e

METRIC = re.compile(r"splitserve:[A-Za-z0-9_:]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _queries() -> dict[str, str]:
    """PromQL of the chart by where it comes from (alert name, panel title, trigger)."""
    out: dict[str, str] = {}
    for options in (cs.Options(values=("values-gpu.yaml",)),
                    cs.Options(values=("values-unified.yaml",), sets=(("monitoring.enabled", "true"),))):
        for rule in cs.by_kind(cs.render(options), "PrometheusRule"):
            for group in rule["spec"]["groups"]:
                for r in group["rules"]:
                    out[f"alert {r['alert']} ({group['name']})"] = r["expr"]
    dashboard = json.loads((cs.CHART / "files" / "dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out[f"panel {panel['title']} {target['refId']}"] = target["expr"]
    out["dashboard variable namespace"] = dashboard["templating"]["list"][1]["definition"]
    keda = cs.Options(sets=(("prefill.autoscaling.trigger", "prometheus"), ("decode.autoscaling.trigger", "prometheus")))
    for so in cs.by_kind(cs.render(keda), "ScaledObject"):
        out[f"keda {so['metadata']['name']}"] = so["spec"]["triggers"][0]["metadata"]["query"]
    return out


def test_queries_name_pools_by_label_not_pod_name() -> None:
    queries = _queries()
    assert len(queries) > 30
    for where, expr in queries.items():
        assert METRIC.search(expr), where
        assert not re.search(r"\bpod(_name)?\s*=~", expr), f"{where}: pools by label, not pod-name regex"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[set[str], set[str]]]:
    """(series names, histogram family names) scraped from a running cluster after one request.

    Series names are the samples in the text plus the series every declared
    family (``# TYPE``) has, so a labelled family with no child yet counts."""
    from prometheus_client.parser import text_string_to_metric_families

    from splitserve.engine.tiny_model import write_tiny_model
    from splitserve.local.launcher import LocalCluster, LocalClusterConfig, free_port

    tmp = tmp_path_factory.mktemp("metrics-up")
    model = write_tiny_model(tmp / "model")
    config = LocalClusterConfig(model=str(model), num_prefill=1, num_decode=1, port=free_port(),
                                engine_args=["--kv-cache-memory", str(64 << 20), "--max-model-len", "2048"],
                                log_dir=tmp / "logs", state_dir=tmp / "state", ready_timeout_seconds=180)
    cluster = LocalCluster(config)
    cluster.start()
    try:
        _one_request(cluster.base_url, str(model))
        texts = [_scrape(config.port)] + [_scrape(pod.http_port) for pod in cluster.pods]
    finally:
        cluster.stop()
    samples: set[str] = set()
    histograms: set[str] = set()
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.type == "histogram":
                histograms.add(family.name)
            samples.update(s.name for s in family.samples)
            # A labelled family with no child yet (no retry so far, no queue
            # for a pool) is still exported: its # TYPE line is in the text.
            samples.update(family.name + suffix for suffix in _SERIES_SUFFIXES.get(family.type, ("",)))
    yield samples, histograms


_SERIES_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": HISTOGRAM_SUFFIXES,
                    "summary": ("_sum", "_count")}


def _one_request(base_url: str, model: str) -> None:
    """A prompt longer than the P/D threshold, so the KV handoff runs too."""
    body = {"model": model, "max_tokens": 8, "ignore_eos": True,
            "messages": [{"role": "user", "content": "tell me about disaggregated serving " * 8}]}
    request = urllib.request.Request(f"{base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        reply: dict[str, Any] = json.load(response)
    assert reply["usage"]["completion_tokens"] == 8


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_every_queried_metric_is_exported(exported: tuple[set[str], set[str]]) -> None:
    samples, histograms = exported
    assert "splitserve:num_requests_running" in samples, "the scrape itself worked"
    missing: dict[str, list[str]] = {}
    bare_histograms: dict[str, list[str]] = {}
    for where, expr in _queries().items():
        for name in METRIC.findall(expr):
            if name in histograms:
                bare_histograms.setdefault(name, []).append(where)
            elif name not in samples:
                missing.setdefault(name, []).append(where)
    assert not bare_histograms, f"histograms used without _bucket/_sum/_count: {bare_histograms}"
    assert not missing, f"named by the chart but not exported by router or pods: {missing}"


def test_histograms_are_used_through_buckets(exported: tuple[set[str], set[str]]) -> None:
    samples, histograms = exported
    used = {n for expr in _queries().values() for n in METRIC.findall(expr)}
    for base in ("splitserve:time_to_first_token_seconds", "splitserve:inter_token_latency_seconds",
                 "splitserve:e2e_request_latency_seconds", "splitserve:kv_transfer_seconds"):
        assert base in histograms
        assert f"{base}_bucket" in used and f"{base}_bucket" in samples


def test_dashboard_source_is_the_shipped_file() -> None:
    """manifests/monitoring/dashboard.json is the chart's file (the golden test regenerates it)."""
    shipped = json.loads((cs.MANIFESTS / "monitoring" / "dashboard.json").read_text())
    assert shipped == json.loads((cs.CHART / "files" / "dashboard.json").read_text())
    assert Path(cs.CHART / "files" / "dashboard.json").stat().st_size > 1000
