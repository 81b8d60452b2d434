"""Views on rendered chart objects shared by the policy and contract tests
(no tests here)."""
from __future__ import annotations

from typing import Any

import chart_support as cs

CPU = cs.Options(values=("values-cpu.yaml",))
GPU = cs.Options(values=("values-gpu.yaml",))
UNIFIED = cs.Options(values=("values-unified.yaml",))
POOL_ROLES = ("prefill", "decode", "unified")


def role(doc: dict[str, Any]) -> str:
    return doc["metadata"]["labels"]["splitserve.io/role"]


def pool_deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Engine Deployments by role."""
    return {role(d): d for d in cs.by_kind(docs, "Deployment") if role(d) in POOL_ROLES}


def engine(deployment: dict[str, Any]) -> dict[str, Any]:
    """The one container of a Deployment."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def flag(args: list[str], name: str) -> str:
    """The value after ``name`` in a container's args."""
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def pod_args(spec: dict[str, Any]) -> list[str]:
    return spec["containers"][0]["args"]


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
