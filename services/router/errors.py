"""Errors the router returns to clients, in OpenAI's error shape.

Types and codes follow vLLM's OpenAI server: ``type`` is the error's class
name (``BadRequestError``, ``NotFoundError`` ...), ``code`` the HTTP status.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class OpenAIError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}``
    (``headers``: extra HTTP headers, e.g. ``Retry-After``)."""

    message: str
    status_code: int = 400
    type: str = "BadRequestError"
    param: str | None = None
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.status_code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(message, 400, "BadRequestError", param)


def unauthorized(message: str) -> OpenAIError:
    return OpenAIError(message, 401, "AuthenticationError")


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(f"The model `{model}` does not exist.", 404, "NotFoundError", "model")


def body_too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        f"Request body is larger than {limit} bytes; send a shorter prompt or raise "
        "the router's max_request_body_bytes.", 413, "RequestEntityTooLargeError")


def internal_error(message: str) -> OpenAIError:
    return OpenAIError(message, 500, "InternalServerError")


def service_unavailable(message: str) -> OpenAIError:
    return OpenAIError(message, 503, "ServiceUnavailableError")


def try_again_later(message: str, retry_after_s: int) -> OpenAIError:
    """A 503 that tells the client when to retry (the router's queue is full,
    a queued request timed out, or the router is shutting down)."""
    return OpenAIError(message, 503, "ServiceUnavailableError",
                       headers={"Retry-After": str(max(1, int(retry_after_s)))})
