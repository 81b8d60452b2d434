"""Policy checks on the rendered chart, over every profile and option set:
hardened containers, resources and probes, no `latest`, secrets only by
reference, a PDB per pool, exact RBAC, KEDA owning replicas."""
from __future__ import annotations

import base64
import re

import pytest

import chart_support as cs
import chart_views as v

@pytest.mark.parametrize("case", cs.MATRIX, ids=cs.matrix_ids())
def test_every_container_is_hardened_and_sized(case: cs.Case) -> None:
    docs = cs.render(case.options)
    for name, spec in cs.pod_specs(docs):
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 1000, name
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in cs.containers(spec):
            where = f"{name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (where, kind)
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: read-only root needs a writable /tmp"


@pytest.mark.parametrize("case", cs.MATRIX, ids=cs.matrix_ids())
def test_long_running_containers_have_probes_and_prestop(case: cs.Case) -> None:
    """Deployments' containers (init containers and the one-shot helm test pod excepted)."""
    for d in cs.by_kind(cs.render(case.options), "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"]["port"] == "http", (d["metadata"]["name"], probe)
            assert c["startupProbe"]["httpGet"]["path"] == "/health"
            assert c["readinessProbe"]["httpGet"]["path"] == "/health"
            assert c["lifecycle"]["preStop"]["sleep"]["seconds"] >= 1


def test_engine_probes_follow_the_contract() -> None:
    for role, d in v.pool_deployments(cs.render(v.GPU)).items():
        c = v.engine(d)
        assert c["livenessProbe"]["httpGet"]["path"] == "/live", role
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model load needs minutes"


@pytest.mark.parametrize("case", cs.MATRIX, ids=cs.matrix_ids())
def test_no_latest_tag_anywhere(case: cs.Case) -> None:
    text = cs.render_text(case.options)
    assert not re.search(r":latest\b", text)
    for name, spec in cs.pod_specs(cs.render(case.options)):
        for c in cs.containers(spec):
            repo, _, tag = c["image"].rpartition(":")
            assert repo and tag and tag != "latest" and "/" not in tag, (name, c["image"])
            assert tag == "0.1.0", "image tag defaults to the chart appVersion"


def test_latest_tag_is_refused() -> None:
    assert "latest" in cs.render_fails(("image.tag", "latest"))


SECRETISH = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


@pytest.mark.parametrize("case", cs.MATRIX, ids=cs.matrix_ids())
def test_secrets_only_by_reference(case: cs.Case) -> None:
    docs = cs.render(case.options)
    for name, spec in cs.pod_specs(docs):
        for c in cs.containers(spec):
            for env in c.get("env", []):
                if SECRETISH.search(env["name"]) and env["name"] != "HF_ALLOW_PATTERNS":
                    assert "value" not in env, (name, env)
                    assert "secretKeyRef" in env["valueFrom"], (name, env)
            for arg in [*c.get("args", []), *c.get("command", [])]:
                assert not re.search(r"--(api-key|hf-token|token)\b", arg), (name, arg)
                assert not re.search(r"Bearer\s+[A-Za-z0-9_\-]{6,}", arg), (name, arg)


def test_created_key_appears_only_inside_its_secret() -> None:
    options = cs.Options(sets=(("apiKey.value", "test-key-not-secret"),))
    text = cs.render_text(options)
    assert "test-key-not-secret" not in text, "the key is only stored base64 in the Secret"
    docs = cs.render(options)
    (secret,) = cs.by_kind(docs, "Secret")
    assert base64.b64decode(secret["data"]["api-key"]).decode() == "test-key-not-secret"
    router = v.engine(cs.named(docs, "Deployment", "splitserve-router"))
    (key_env,) = [e for e in router["env"] if e["name"] == "SPLITSERVE_API_KEY"]
    assert key_env["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "api-key"}


def test_existing_key_secret_is_referenced_not_created() -> None:
    docs = cs.render(cs.Options(sets=(("apiKey.existingSecret", "my-key"), ("apiKey.secretKey", "token"))))
    assert not cs.by_kind(docs, "Secret")
    for name, spec in cs.pod_specs(docs):
        for c in spec["containers"]:
            refs = [e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if e["name"] == "SPLITSERVE_API_KEY"]
            if refs:
                assert refs == [{"name": "my-key", "key": "token"}], name


def test_generated_key_when_no_value() -> None:
    (secret,) = cs.by_kind(cs.render(), "Secret")
    assert len(base64.b64decode(secret["data"]["api-key"])) == 40


def test_api_key_off_means_no_key_env() -> None:
    docs = cs.render(cs.Options(sets=(("apiKey.enabled", "false"),)))
    assert not cs.by_kind(docs, "Secret")
    for _, spec in cs.pod_specs(docs):
        for c in spec["containers"]:
            assert all(e["name"] != "SPLITSERVE_API_KEY" for e in c.get("env", []))


@pytest.mark.parametrize("case", cs.MATRIX, ids=cs.matrix_ids())
def test_a_pdb_per_pool_and_router(case: cs.Case) -> None:
    docs = cs.render(case.options)
    pdbs = cs.by_kind(docs, "PodDisruptionBudget")
    for d in cs.by_kind(docs, "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs if v.matches(p["spec"]["selector"], labels)]
        assert len(covering) == 1, d["metadata"]["name"]
        assert covering[0]["spec"]["maxUnavailable"] >= 1


@pytest.mark.parametrize("case", cs.MATRIX, ids=cs.matrix_ids())
def test_rbac_is_exactly_list_watch_endpointslices(case: cs.Case) -> None:
    docs = cs.render(case.options)
    assert not cs.by_kind(docs, "ClusterRole") and not cs.by_kind(docs, "ClusterRoleBinding")
    router = cs.named(docs, "Deployment", "splitserve-router")["spec"]["template"]["spec"]
    roles = cs.by_kind(docs, "Role")
    if "--discovery" in v.pod_args(router) and v.flag(v.pod_args(router), "--discovery") != "kubernetes":
        assert not roles and router["automountServiceAccountToken"] is False
        return
    (role,) = roles
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["list", "watch"]}]
    (binding,) = cs.by_kind(docs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": router["serviceAccountName"],
                                    "namespace": cs.NAMESPACE}]
    assert router["automountServiceAccountToken"] is True
    for d in v.pool_deployments(docs).values():
        assert d["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


@pytest.mark.parametrize("case", cs.MATRIX, ids=cs.matrix_ids())
def test_keda_owns_replicas_when_on(case: cs.Case) -> None:
    docs = cs.render(case.options)
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in cs.by_kind(docs, "ScaledObject")}
    router_svc = cs.named(docs, "Service", "splitserve-router")
    for role, d in v.pool_deployments(docs).items():
        name = d["metadata"]["name"]
        if name not in scaled:
            assert isinstance(d["spec"]["replicas"], int)
            continue
        assert "replicas" not in d["spec"], f"{name}: the Deployment must not fight KEDA over replicas"
        so = scaled[name]
        assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
        (trigger,) = so["spec"]["triggers"]
        if trigger["type"] == "external-push":
            meta = trigger["metadata"]
            assert meta["scalerAddress"] == f"splitserve-router.{cs.NAMESPACE}.svc.cluster.local:9090"
            assert meta["pool"] == role and float(meta["target"]) > 0
            assert {"name": "scaler", "port": 9090, "targetPort": "scaler", "protocol": "TCP"} in router_svc["spec"]["ports"]
            assert v.flag(v.pod_args(cs.named(docs, "Deployment", "splitserve-router")["spec"]["template"]["spec"]),
                         "--scaler-port") == "9090"
        else:
            assert trigger["type"] == "prometheus"
            assert f'pool="{role}"' in trigger["metadata"]["query"]
