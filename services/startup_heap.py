"""Keeps the garbage collector off the objects a process builds at startup.

A router or pod imports torch and transformers and loads a tokenizer or a
model: ~300k tracked objects that live as long as the process. Every
oldest-generation collection walks all of them (~150 ms on a 2-core host),
a pause that lands on some request's first token or on a decode step.
``gc.freeze()`` moves them to a permanent generation the collector skips,
as vLLM's API server does after startup; the collector still runs, on
what is allocated afterwards."""
from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then freeze every object alive now; returns how many
    objects were frozen. Call it once startup is done (servers bound, model
    loaded), before serving traffic."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
