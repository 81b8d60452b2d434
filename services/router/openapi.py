"""The router's OpenAPI description, with the request bodies its routes read.

Routes read and bound their bodies themselves (``app._parse``: 413 before
parsing, OpenAI-shaped 400s), so FastAPI cannot see the body models; this
adds them to the generated document so clients and fuzzers (schemathesis)
know what to send.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

_REF = "#/components/schemas/{model}"


def describe_request_bodies(app: FastAPI, bodies: Mapping[str, type[BaseModel]]) -> None:
    """Make ``app.openapi()`` state ``bodies[path]`` as the JSON body of that
    path's POST (built once, on first use, as FastAPI does)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for path, model in bodies.items():
            schema = model.model_json_schema(ref_template=_REF)
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
            document["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}},
            }
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
