"""values.schema.json refuses unknown keys and wrong types at every level;
the templates refuse impossible combinations with a message; every value is
documented with a helm-docs ``# --`` comment."""
from __future__ import annotations

import json
import re
from typing import Any

import pytest

import chart_support as cs

SCHEMA_REFUSALS = [
    # (--set pairs, what helm's schema error names)
    ((("prefil.replicas", "1"),), "additional properties 'prefil' not allowed"),
    ((("decode.replicaz", "1"),), "additional properties 'replicaz' not allowed"),
    ((("prefill.engine.maxModelLenn", "4096"),), "'maxModelLenn' not allowed"),
    ((("router.ingress.hostz", "x"),), "'hostz' not allowed"),
    ((("monitoring.prometheusRule.ttftP99", "1"),), "'ttftP99' not allowed"),
    ((("prefill.replicas", "-1"),), "/prefill/replicas"),
    ((("decode.autoscaling.maxReplicas", "0"),), "/decode/autoscaling/maxReplicas"),
    ((("prefill.replicas", "two"),), "got string, want integer"),
    ((("router.port", "eighty"),), "/router/port"),
    ((("router.port", "70000"),), "/router/port"),
    ((("apiKey.enabled", "yes"),), "/apiKey/enabled"),
    ((("model.source", "s3"),), "/model/source"),
    ((("router.discovery", "consul"),), "/router/discovery"),
    ((("prefill.autoscaling.trigger", "cpu"),), "/prefill/autoscaling/trigger"),
    ((("decode.autoscaling.idleReplicaCount", "1"),), "/decode/autoscaling/idleReplicaCount"),
    ((("prefill.engine.dtype", "fp8"),), "/prefill/engine/dtype"),
    ((("router.ingress.streamingTimeoutSeconds", "60"),), "/router/ingress/streamingTimeoutSeconds"),
    ((("prefill.shmSizeLimit", "lots"),), "/prefill/shmSizeLimit"),
    ((("prefill.nodeSelector", "gpu"),), "/prefill/nodeSelector"),
    ((("unified.tolerations", "none"),), "/unified/tolerations"),
]


@pytest.mark.parametrize("sets,message", SCHEMA_REFUSALS, ids=[s[0][0] + "=" + s[0][1] for s, _ in SCHEMA_REFUSALS])
def test_schema_refuses(sets: tuple[tuple[str, str], ...], message: str) -> None:
    error = cs.render_fails(*sets)
    assert "don't meet the specifications of the schema" in error, error
    assert message in error, error


TEMPLATE_REFUSALS = [
    ((("prefill.autoscaling.minReplicas", "5"),),
     "prefill.autoscaling.minReplicas (5) is greater than prefill.autoscaling.maxReplicas (4)"),
    ((("decode.autoscaling.minReplicas", "3"), ("decode.autoscaling.maxReplicas", "2")),
     "decode.autoscaling.minReplicas (3) is greater than decode.autoscaling.maxReplicas (2)"),
    ((("unified.enabled", "true"),), "unified.enabled=true cannot be combined with the prefill/decode pools"),
    ((("decode.enabled", "false"),), "prefill and decode pools run together"),
    ((("prefill.enabled", "false"), ("decode.enabled", "false")), "no engine pool enabled"),
    ((("model.source", "hf"),), "model.source=hf needs model.hf.repo"),
    ((("model.source", "pvc"),), "model.source=pvc needs model.pvc.claimName"),
    ((("model.source", "hostPath"),), "model.source=hostPath needs model.hostPath.path"),
    ((("model.source", "pvc"), ("model.pvc.claimName", "m"), ("model.path", "/data/m")),
     "model.path (/data/m) must lie under model.mountPath (/models)"),
    ((("decode.autoscaling.minReplicas", "0"), ("decode.autoscaling.idleReplicaCount", "0")),
     "decode.autoscaling.idleReplicaCount (0) must be below minReplicas (0)"),
    ((("router.scalerPort", "0"),), "prefill.autoscaling.trigger=external needs the router's scaler"),
    ((("router.discovery", "static"),), "router.discovery=static needs router.static.prefill"),
    ((("router.ingress.enabled", "true"), ("router.httpRoute.enabled", "true")),
     "router.ingress and router.httpRoute are alternatives"),
    ((("decode.engine.blockSize", "32"),), "prefill.engine.blockSize (16) and decode.engine.blockSize (32) must match"),
    ((("networkPolicy.kvPortRange.start", "5000"), ("networkPolicy.kvPortRange.end", "4000")),
     "networkPolicy.kvPortRange: end (4000) must be >= start (5000)"),
    ((("image.tag", "latest"),), "image.tag: `latest` is refused"),
    ((("grpcTLS.enabled", "true"),), "grpcTLS.enabled=true needs grpcTLS.secretName"),
    ((("router.tls.enabled", "true"),), "router.tls.enabled=true needs router.tls.secretName"),
    ((("router.tls.enabled", "true"), ("router.tls.secretName", "c"), ("router.httpRoute.enabled", "true")),
     "router.tls with router.httpRoute needs a BackendTLSPolicy"),
]


@pytest.mark.parametrize("sets,message", TEMPLATE_REFUSALS, ids=[m.split(" ")[0] for _, m in TEMPLATE_REFUSALS])
def test_impossible_combinations_fail_with_a_message(sets: tuple[tuple[str, str], ...], message: str) -> None:
    error = cs.render_fails(*sets)
    assert message in error, error


def test_keda_off_ignores_its_min_max() -> None:
    """min > max only matters when KEDA is on."""
    cs.render(cs.Options(sets=(("prefill.autoscaling.enabled", "false"), ("prefill.autoscaling.minReplicas", "9"))))


def _object_schemas(node: Any, path: str = "$") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            out.append((path, node))
        for key, value in node.items():
            out += _object_schemas(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _object_schemas(value, f"{path}[{i}]")
    return out


def test_schema_closes_every_object() -> None:
    schema = json.loads((cs.CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    objects = _object_schemas(schema)
    assert len(objects) > 40
    for path, node in objects:
        assert node.get("additionalProperties") is False, path
    pool = schema["definitions"]["pool"]
    for role in ("prefill", "decode", "unified"):
        assert schema["properties"][role] == {"$ref": "#/definitions/pool"}, "pools share one shape"
    assert pool["properties"]["autoscaling"]["properties"]["idleReplicaCount"]["enum"] == [0, None]


def _keys_without_doc(path: str) -> list[str]:
    """Values not covered by a ``# --`` comment on their key or on an ancestor key.

    A key with an inline value, or with a block list under it, is a value; a
    key with only keys under it is a section whose keys are checked instead.
    """
    missing = []
    stack: list[tuple[int, bool, str]] = []  # (indent, documented, key line)
    pending_doc = False
    for line in (cs.CHART / path).read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending_doc = True
            continue
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent and not (stripped.startswith("- ") and stack[-1][0] == indent):
            stack.pop()
        if stripped.startswith("- "):
            if stack and not any(documented for _, documented, _ in stack):
                missing.append(f"{path}: {stack[-1][2]} (a list)")
                stack[-1] = (stack[-1][0], True, stack[-1][2])  # report each list once
            pending_doc = False
            continue
        match = re.match(r"^([A-Za-z0-9_.\-/\"]+):(\s|$)", stripped)
        if not match:
            pending_doc = False
            continue
        documented = pending_doc or any(documented for _, documented, _ in stack)
        if stripped.split(":", 1)[1].strip() and not documented:
            missing.append(f"{path}: {stripped}")
        stack.append((indent, documented, stripped))
        pending_doc = False
    return missing


def test_doc_check_finds_an_undocumented_value(tmp_path, monkeypatch) -> None:
    """The checker above can fail."""
    (tmp_path / "v.yaml").write_text("a:\n  # -- documented\n  b: 1\n  c: 2\nd:\n  - x\n")
    monkeypatch.setattr(cs, "CHART", tmp_path)
    assert _keys_without_doc("v.yaml") == ["v.yaml: c: 2", "v.yaml: d: (a list)"]


@pytest.mark.parametrize("path", ["values.yaml", *(f"values-{p}.yaml" for p in cs.PROFILES)])
def test_every_value_has_a_helm_docs_comment(path: str) -> None:
    assert _keys_without_doc(path) == []
