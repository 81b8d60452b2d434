"""Model definitions (torch) that run a flattened varlen batch over the paged KV cache."""
from __future__ import annotations
