"""Errors the engine raises for bad input; each message says what to change."""
from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine refuses before it is queued (maps to HTTP 400 /
    gRPC INVALID_ARGUMENT). The engine keeps serving other requests."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus at least one output token) does not fit max_model_len."""


class EmptyPromptError(InvalidRequestError):
    """The prompt has no tokens."""


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or configuration is not supported."""
