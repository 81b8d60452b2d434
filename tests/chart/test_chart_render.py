"""The chart lints, renders for every profile and option set, and every object
it renders is schema-valid for Kubernetes 1.37 (core: kubernetes-validate
strict; custom resources: jsonschema against tests/chart/schemas/)."""
from __future__ import annotations

import pytest

import chart_support as cs


@pytest.mark.parametrize("profile", [None, *cs.PROFILES])
def test_helm_lint_strict(profile: str | None) -> None:
    args = ["lint", "--strict", str(cs.CHART), "--namespace", cs.NAMESPACE, "--kube-version", cs.KUBE_VERSION]
    if profile:
        args += ["-f", str(cs.profile_values(profile))]
    result = cs.helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("case", cs.MATRIX, ids=cs.matrix_ids())
def test_render_is_schema_valid(case: cs.Case) -> None:
    docs = cs.render(case.options)
    assert docs, "nothing rendered"
    errors = {}
    for doc in docs:
        problems = cs.validation_errors(doc)
        if problems:
            errors[f"{doc['kind']}/{doc['metadata']['name']}"] = problems
    assert not errors, errors


@pytest.mark.parametrize("case", cs.MATRIX, ids=cs.matrix_ids())
def test_every_object_is_namespaced_and_labelled(case: cs.Case) -> None:
    for doc in cs.render(case.options):
        meta = doc["metadata"]
        assert meta.get("namespace") == cs.NAMESPACE or doc["kind"] == "ConfigMap", meta
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == cs.RELEASE, (doc["kind"], meta["name"])
        assert labels.get("app.kubernetes.io/part-of") == "splitserve", (doc["kind"], meta["name"])


def test_unknown_kind_fails_validation() -> None:
    """The validator never lets a kind without a schema through."""
    with pytest.raises(cs.SchemaMissing):
        cs.validation_errors({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


def test_validator_rejects_a_bad_object() -> None:
    """Strict validation catches a misspelt field (so the matrix above can fail)."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"portz": []}}
    assert cs.validation_errors(bad)
    bad_cr = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "s"},
              "spec": {"scaleTargetRef": {"name": "d"}, "triggers": [{"type": "cpu", "metadata": {}}],
                       "minReplicas": 1}}
    assert cs.validation_errors(bad_cr)


@pytest.mark.parametrize("case", cs.MATRIX, ids=cs.matrix_ids())
def test_custom_resources_have_a_copied_schema(case: cs.Case) -> None:
    for doc in cs.render(case.options):
        group = doc["apiVersion"].split("/")[0]
        if "." in group and not group.endswith(".k8s.io") or group == "gateway.networking.k8s.io":
            assert (doc["apiVersion"], doc["kind"]) in cs.CR_SCHEMAS, doc["kind"]


def test_cached_validator_agrees_with_kubernetes_validate() -> None:
    """The cached validator gives kubernetes-validate's own verdicts."""
    import kubernetes_validate

    good = cs.named(cs.render(), "Deployment", "splitserve-router")
    kubernetes_validate.validate(good, cs.KUBE_VERSION, strict=True)
    assert cs.validation_errors(good) == []
    bad = {**good, "spec": {**good["spec"], "replicaz": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, cs.KUBE_VERSION, strict=True)
    assert cs.validation_errors(bad)
