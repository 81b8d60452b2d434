"""gRPC message size limit shared by routers and pods (both directions).

Large prompts travel as repeated uint32; 64 MiB leaves room for 10M tokens.
Servers take 4 MiB by default, so every server and channel sets this.
"""
from __future__ import annotations

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
