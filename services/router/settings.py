"""Router settings: one dataclass, validated once, built from the environment
by ``settings_from_env`` (never at import)."""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

logger = logging.getLogger(__name__)

API_KEY_ENV = "SPLITSERVE_API_KEY"


@dataclass(frozen=True)
class RouterSettings:
    """Limits and identity of one router.

    ``api_key`` None means the API is open (``settings_from_env`` logs a
    warning). ``served_model_names`` are the names accepted in ``model`` and
    listed by ``/v1/models``; responses echo the name the client sent.
    ``max_tokens_limit`` caps ``max_tokens``; ``default_max_tokens`` applies
    when a request gives none (None: ``max_tokens_limit``).
    ``block_size`` must equal the engines' KV block size (block hashes for
    routing).
    ``tool_call_parser`` ("hermes") turns on ``tool_choice: "auto"`` (vLLM's
    ``--enable-auto-tool-choice --tool-call-parser``); None refuses it.
    ``enable_prompt_tokens_details`` adds ``usage.prompt_tokens_details``
    (``cached_tokens``) as vLLM's flag of that name. ``model_root`` is the
    model path ``/v1/models`` reports as ``root``. ``enable_log_requests``
    (vLLM's flag) logs each request's prompt, parameters and output text;
    off, no log line carries prompt or output text.
    """

    served_model_names: tuple[str, ...] = ("splitserve",)
    api_key: str | None = None
    max_prompt_tokens: int = 32768
    max_tokens_limit: int = 4096
    default_max_tokens: int | None = None
    max_n: int = 16
    max_request_body_bytes: int = 4 * 1024 * 1024
    max_stop_strings: int = 16
    block_size: int = 16
    tool_call_parser: str | None = None
    enable_prompt_tokens_details: bool = False
    model_root: str | None = None
    enable_log_requests: bool = False

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError("served_model_names must name at least one non-empty model")
        for name in ("max_prompt_tokens", "max_tokens_limit", "max_n",
                     "max_request_body_bytes", "max_stop_strings", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RouterSettings.{name} must be a positive integer, got {value!r}")
        if self.default_max_tokens is not None and not (
                1 <= self.default_max_tokens <= self.max_tokens_limit):
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must be in "
                f"[1, max_tokens_limit={self.max_tokens_limit}]")
        if self.tool_call_parser not in (None, "hermes"):
            raise ValueError(f"tool_call_parser must be 'hermes' (or unset), got {self.tool_call_parser!r}")
        if self.api_key == "":
            raise ValueError(f"{API_KEY_ENV} is set but empty; unset it for an open API or set a key")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


def settings_from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> RouterSettings:
    """Build settings, reading the API key from ``SPLITSERVE_API_KEY``.

    ``overrides`` (e.g. from the CLI) win over defaults. Warns when no key is
    configured, since the API is then open to anyone who can reach it.
    """
    env = os.environ if env is None else env
    settings = replace(RouterSettings(), **overrides)
    if "api_key" not in overrides:
        settings = replace(settings, api_key=env.get(API_KEY_ENV) or None)
    if settings.api_key is None:
        logger.warning("%s is not set: the OpenAI API accepts requests without a key", API_KEY_ENV)
    return settings
