"""Stop strings applied to streamed text, as OpenAI does: the output ends just
before the first stop string, which is not included."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopResult:
    """Text safe to send now, and whether a stop string ended the output."""

    text: str
    stopped: bool = False
    stop_string: str | None = None


class StopStringMatcher:
    """Finds stop strings across text deltas of one sequence.

    ``feed`` returns the text that can no longer become part of a stop string;
    a suffix that is a proper prefix of some stop string is held back until
    the next delta decides it (so a stop string split across tokens never
    leaks its first half to a streaming client). After a stop, further input
    is ignored. ``flush`` releases held text when the sequence ends otherwise.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stops = [s for s in dict.fromkeys(stop) if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> StopResult:
        if self.stopped:
            return StopResult("", stopped=True)
        if not self._stops:
            return StopResult(delta)
        text = self._held + delta
        hit = self._earliest(text)
        if hit is not None:
            index, stop = hit
            self._held = ""
            self.stopped = True
            return StopResult(text[:index], stopped=True, stop_string=stop)
        keep = self._partial_suffix_len(text)
        self._held = text[len(text) - keep:] if keep else ""
        return StopResult(text[:len(text) - keep])

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _earliest(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stops:
            index = text.find(stop)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _partial_suffix_len(self, text: str) -> int:
        for size in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0
