"""The rendered chart follows the runtime contract and the profiles: pod and
router flags (parsed by the real CLI), drain-derived grace periods, one
template for every pool, model sources, GPU placement, exposure (Ingress,
HTTPRoute), the helm test pod, NOTES, the dashboard ConfigMap."""
from __future__ import annotations

import json
from typing import Any

import pytest

import chart_support as cs
import chart_views as v


def test_idle_replica_count_zero_is_rendered() -> None:
    docs = cs.render(v.UNIFIED)
    (so,) = cs.by_kind(docs, "ScaledObject")
    assert so["spec"]["idleReplicaCount"] == 0 and so["spec"]["minReplicaCount"] == 1


def test_grace_periods_follow_the_drain_budget() -> None:
    docs = cs.render(v.GPU)
    pools = v.pool_deployments(docs)
    values = {"prefill": (5, 30, 10), "decode": (5, 300, 10)}  # preStop, budget, margin (values-gpu.yaml)
    for role, (pre_stop, budget, margin) in values.items():
        spec = pools[role]["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] == pre_stop + budget + margin, role
        args = v.engine(pools[role])["args"]
        assert float(v.flag(args, "--kv-lease-seconds" if role == "prefill" else "--shutdown-grace-seconds")) == budget
    # Changing the budget moves the grace period: it is derived, not copied.
    more = cs.render(cs.Options(sets=(("prefill.kvLeaseSeconds", "90"),), json_sets=(("decode.shutdownGraceSeconds", "7.5"),)))
    pools = v.pool_deployments(more)
    assert pools["prefill"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 5 + 90 + 10
    assert pools["decode"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 5 + 8 + 10
    router = cs.named(more, "Deployment", "splitserve-router")["spec"]["template"]["spec"]
    assert router["terminationGracePeriodSeconds"] == 5 + 30 + 10


@pytest.mark.parametrize("options", [v.CPU, v.GPU, v.UNIFIED], ids=["cpu", "gpu", "unified"])
def test_engine_pods_get_the_contract_flags(options: cs.Options) -> None:
    for role, d in v.pool_deployments(cs.render(options)).items():
        c = v.engine(d)
        args = c["args"]
        assert args[:2] == ["serve", role]
        assert v.flag(args, "--host") == "$(POD_IP)" and v.flag(args, "--port") == "50051"  # not 0.0.0.0
        assert v.flag(args, "--http-port") == "8081"
        assert v.flag(args, "--advertise-address") == "$(POD_IP):50051"
        assert v.flag(args, "--agent-name") == "$(POD_NAME)"
        assert v.flag(args, "--model").startswith("/models/")
        env = {e["name"]: e for e in c["env"]}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert [p["name"] for p in c["ports"]] == ["grpc", "http"]
        volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory" and volumes["shm"]["emptyDir"]["sizeLimit"]
        assert volumes["tmp"]["emptyDir"]["sizeLimit"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts["/dev/shm"] == "shm" and mounts["/tmp"] == "tmp"


def test_pool_services_are_headless_with_named_ports() -> None:
    docs = cs.render(v.CPU)
    for role in ("prefill", "decode"):
        svc = cs.named(docs, "Service", f"splitserve-{role}")["spec"]
        assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is False
        assert [(p["name"], p["port"]) for p in svc["ports"]] == [("grpc", 50051), ("http", 8081)]
        assert svc["selector"]["splitserve.io/role"] == role
    router = cs.named(docs, "Service", "splitserve-router")["spec"]
    assert ("http", 8000) in [(p["name"], p["port"]) for p in router["ports"]]


def _shape(value: Any, path: str = "") -> set[str]:
    if isinstance(value, dict):
        return {path} | {p for k, v in value.items() for p in _shape(v, f"{path}.{k}")}
    if isinstance(value, list):
        return {path} | {p for v in value for p in _shape(v, f"{path}[]")}
    return {path}


def test_pools_are_rendered_by_one_template() -> None:
    """prefill and decode Deployments have the same shape (same helper, per role)."""
    pools = v.pool_deployments(cs.render(v.CPU))
    assert _shape(pools["prefill"]) == _shape(pools["decode"])
    unified_fixed = cs.Options(values=("values-unified.yaml",), sets=(("unified.autoscaling.enabled", "false"),))
    unified = v.pool_deployments(cs.render(unified_fixed))["unified"]
    assert _shape(unified) == _shape(pools["prefill"])


@pytest.mark.parametrize("discovery", ["kubernetes", "dns"])
def test_router_discovery_flags(discovery: str) -> None:
    docs = cs.render(cs.Options(values=("values-cpu.yaml",), sets=(("router.discovery", discovery),)))
    args = v.pod_args(cs.named(docs, "Deployment", "splitserve-router")["spec"]["template"]["spec"])
    assert args[0] == "router" and v.flag(args, "--discovery") == discovery
    assert v.flag(args, "--port") == "8000" and v.flag(args, "--host") == "$(POD_IP),127.0.0.1"
    for flag in ("--max-queued-requests", "--queue-timeout-seconds", "--shutdown-grace-seconds", "--reconcile-seconds"):
        assert float(v.flag(args, flag)) > 0
    if discovery == "kubernetes":
        assert v.flag(args, "--prefill-service") == "splitserve-prefill"
        assert v.flag(args, "--decode-service") == "splitserve-decode"
        assert v.flag(args, "--namespace") == cs.NAMESPACE and v.flag(args, "--grpc-port-name") == "grpc"
    else:
        assert v.flag(args, "--prefill-service") == f"splitserve-prefill.{cs.NAMESPACE}.svc.cluster.local:50051"
    assert "--unified-service" not in args


def test_unified_router_flags() -> None:
    args = v.pod_args(cs.named(cs.render(v.UNIFIED), "Deployment", "splitserve-router")["spec"]["template"]["spec"])
    assert v.flag(args, "--unified-service") == "splitserve-unified"
    assert "--prefill-service" not in args and "--decode-service" not in args


def test_gpu_profile_places_pools_and_asks_for_gpus() -> None:
    docs = cs.render(v.GPU)
    pools = v.pool_deployments(docs)
    for role, node_class in (("prefill", "compute"), ("decode", "bandwidth")):
        spec = pools[role]["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {"splitserve.io/node-class": node_class}
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        res = v.engine(pools[role])["resources"]
        assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1
        (init,) = spec["initContainers"]
        env = {e["name"]: e for e in init["env"]}
        assert env["HF_REPO"]["value"] == "meta-llama/Llama-3.1-8B-Instruct"
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
        assert env["HF_ALLOW_PATTERNS"]["value"] == "", "engine pods download the weights"
    router = cs.named(docs, "Deployment", "splitserve-router")["spec"]["template"]["spec"]
    (init,) = router["initContainers"]
    patterns = {e["name"]: e.get("value") for e in init["env"]}["HF_ALLOW_PATTERNS"]
    assert "*.json" in patterns and "safetensors" not in patterns, "the router needs the tokenizer only"
    assert "nvidia.com/gpu" not in router["containers"][0]["resources"]["limits"]


def test_cpu_profile_has_no_gpu_and_the_baked_model() -> None:
    docs = cs.render(v.CPU)
    for d in v.pool_deployments(docs).values():
        c = v.engine(d)
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        assert v.flag(c["args"], "--model") == "/models/tiny"
        assert "initContainers" not in d["spec"]["template"]["spec"]
    assert not cs.by_kind(docs, "ScaledObject")


@pytest.mark.parametrize("source,volume_key", [("model-pvc", "persistentVolumeClaim"),
                                               ("model-hostpath", "hostPath"), ("model-hf", "emptyDir")])
def test_model_sources_mount_one_model_volume(source: str, volume_key: str) -> None:
    (case,) = [c for c in cs.MATRIX if c.name == source]
    docs = cs.render(case.options)
    for name, spec in cs.pod_specs(docs):
        if name.endswith("test-completion"):
            continue
        (model,) = [v for v in spec["volumes"] if v["name"] == "model"]
        assert volume_key in model, name
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "model"]
        assert mount["mountPath"] == "/models"
        assert mount["readOnly"] is (source != "model-hf"), name


def test_ingress_is_streaming_safe() -> None:
    (case,) = [c for c in cs.MATRIX if c.name == "ingress"]
    (ingress,) = cs.by_kind(cs.render(case.options), "Ingress")
    ann = ingress["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 300
    assert int(ann["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 300
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "splitserve-router", "port": {"name": "http"}}


def test_httproute_is_the_alternative() -> None:
    (case,) = [c for c in cs.MATRIX if c.name == "httproute"]
    docs = cs.render(case.options)
    assert not cs.by_kind(docs, "Ingress")
    (route,) = cs.by_kind(docs, "HTTPRoute")
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": "splitserve-router", "port": 8000}]
    assert rule["timeouts"]["request"] == "3600s"


def test_helm_test_pod_checks_key_and_no_key() -> None:
    docs = cs.render(v.CPU)
    (pod,) = cs.by_kind(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    script = c["command"][-1]
    assert c["image"] == "splitserve:0.1.0" and c["command"][0] == "python3"
    assert "/v1/chat/completions" in script and "401" in script and "urllib" in script
    env = {e["name"]: e for e in c["env"]}
    assert env["ROUTER_URL"]["value"] == f"http://splitserve-router.{cs.NAMESPACE}.svc.cluster.local:8000"
    assert env["SPLITSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "splitserve-api-key"


def test_notes_show_endpoint_curl_and_scaling() -> None:
    result = cs.helm("install", cs.RELEASE, str(cs.CHART), "--dry-run=client", "--namespace", cs.NAMESPACE,
                     "-f", str(cs.profile_values("cpu")))
    assert result.returncode == 0, result.stderr
    notes = result.stdout[result.stdout.index("NOTES:"):]
    assert f"http://splitserve-router.{cs.NAMESPACE}.svc.cluster.local:8000/v1" in notes
    assert "get secret splitserve-api-key" in notes and 'Authorization: Bearer $KEY' in notes
    assert "kubectl -n splitserve scale deployment/splitserve-decode --replicas=N" in notes
    assert "rollout restart" in notes and "helm test" in notes


def test_dashboard_configmap_is_labelled_for_grafana() -> None:
    (case,) = [c for c in cs.MATRIX if c.name == "monitoring-on"]
    (cm,) = cs.by_kind(cs.render(case.options), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["splitserve.json"])
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    for wanted in ("Throughput", "Latency", "KV cache", "Queues", "Prefill / decode"):
        assert any(r.startswith(wanted) for r in rows), wanted


def test_monitoring_off_renders_no_monitoring_objects() -> None:
    docs = cs.render(v.CPU)
    assert not {"ServiceMonitor", "PodMonitor", "PrometheusRule"} & {d["kind"] for d in docs}
    assert not cs.by_kind(docs, "ConfigMap")


@pytest.mark.parametrize("case", cs.MATRIX, ids=cs.matrix_ids())
def test_rendered_args_parse_with_the_real_cli(case: cs.Case) -> None:
    """Every `splitserve ...` container command is accepted by the CLI's own parser."""
    from splitserve.cli import build_parser

    parser = build_parser()
    substitutions = {"$(POD_IP)": "10.0.0.7", "$(POD_NAME)": "splitserve-decode-abc12"}
    for name, spec in cs.pod_specs(cs.render(case.options)):
        for c in spec["containers"]:
            if "args" not in c:
                continue
            args = [substitutions.get(a, a.replace("$(POD_IP)", "10.0.0.7")) for a in c["args"]]
            parsed = parser.parse_args(args)
            assert parsed.command == args[0], name
            if args[0] == "router":
                assert parsed.discovery in ("kubernetes", "dns", "static")
            else:
                assert parsed.advertise_address == "10.0.0.7:50051"


def test_processes_bind_the_pod_ip_unless_told_otherwise() -> None:
    for bind, pod_host, router_host in (("$(POD_IP)", "$(POD_IP)", "$(POD_IP),127.0.0.1"),
                                        ("0.0.0.0", "0.0.0.0", "0.0.0.0"), ("10.0.0.9", "10.0.0.9", "10.0.0.9,127.0.0.1")):
        docs = cs.render(cs.Options(values=("values-cpu.yaml",), sets=(("bindAddress", bind),)))
        for d in v.pool_deployments(docs).values():
            assert v.flag(v.engine(d)["args"], "--host") == pod_host
        router = cs.named(docs, "Deployment", "splitserve-router")["spec"]["template"]["spec"]
        assert v.flag(v.pod_args(router), "--host") == router_host


def test_grpc_mutual_tls_flags_and_secret_on_every_pod_and_the_router() -> None:
    docs = cs.render(cs.Options(values=("values-cpu.yaml",), sets=(
        ("grpcTLS.enabled", "true"), ("grpcTLS.secretName", "grpc-certs"), ("grpcTLS.serverName", "pods.local"))))
    specs = [d["spec"]["template"]["spec"] for d in v.pool_deployments(docs).values()]
    specs.append(cs.named(docs, "Deployment", "splitserve-router")["spec"]["template"]["spec"])
    for spec in specs:
        (container,) = spec["containers"]
        args = container["args"]
        assert v.flag(args, "--grpc-ssl-certfile") == "/etc/splitserve/grpc-tls/tls.crt"
        assert v.flag(args, "--grpc-ssl-keyfile") == "/etc/splitserve/grpc-tls/tls.key"
        assert v.flag(args, "--grpc-ssl-ca-certs") == "/etc/splitserve/grpc-tls/ca.crt"
        assert v.flag(args, "--grpc-ssl-server-name") == "pods.local"
        mount = {m["name"]: m for m in container["volumeMounts"]}["grpc-tls"]
        assert mount["readOnly"] and mount["mountPath"] == "/etc/splitserve/grpc-tls"
        assert {vol["name"]: vol for vol in spec["volumes"]}["grpc-tls"]["secret"]["secretName"] == "grpc-certs"
    off = cs.render(v.CPU)
    for d in v.pool_deployments(off).values():
        assert "--grpc-ssl-certfile" not in v.engine(d)["args"]


def test_router_https_flags_probes_test_monitor_and_ingress() -> None:
    docs = cs.render(cs.Options(values=("values-cpu.yaml",), sets=(
        ("router.tls.enabled", "true"), ("router.tls.secretName", "router-cert"), ("router.ingress.enabled", "true"),
        ("monitoring.enabled", "true"), ("monitoring.serviceMonitor.enabled", "true")), skip_tests=False))
    spec = cs.named(docs, "Deployment", "splitserve-router")["spec"]["template"]["spec"]
    (router,) = spec["containers"]
    assert v.flag(router["args"], "--ssl-keyfile") == "/etc/splitserve/router-tls/tls.key"
    assert v.flag(router["args"], "--ssl-certfile") == "/etc/splitserve/router-tls/tls.crt"
    assert {m["name"]: m for m in router["volumeMounts"]}["router-tls"]["readOnly"]
    assert {vol["name"]: vol for vol in spec["volumes"]}["router-tls"]["secret"]["secretName"] == "router-cert"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert router[probe]["httpGet"]["scheme"] == "HTTPS", probe
    (test_pod,) = [d for d in docs if d["kind"] == "Pod"]
    env = {e["name"]: e.get("value") for e in test_pod["spec"]["containers"][0]["env"]}
    assert env["ROUTER_URL"].startswith("https://")
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0]["scheme"] == "https"
    ingress = cs.named(docs, "Ingress", "splitserve-router")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
    plain = cs.named(cs.render(v.CPU), "Deployment", "splitserve-router")["spec"]["template"]["spec"]
    assert "--ssl-keyfile" not in plain["containers"][0]["args"]
    assert "scheme" not in plain["containers"][0]["readinessProbe"]["httpGet"]
