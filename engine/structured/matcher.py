"""One request's place in its constraint: an llguidance matcher kept in step
with the request's output tokens."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import llguidance

logger = logging.getLogger(__name__)


class RequestMatcher:
    """Wraps one ``llguidance.LLMatcher`` that has consumed exactly the
    request's output tokens so far.

    The engine thread advances it in ``Request.append_output_token``; the
    mask filler reads it (``ll_matcher``) on its worker thread only while a
    step's forward runs, when nothing advances it. llguidance never raises for
    a bad token: the matcher enters an error state, which counts as stopped
    (the request ends) and is logged.
    """

    __slots__ = ("ll_matcher", "mask_words", "_logged")

    def __init__(self, ll_matcher: llguidance.LLMatcher, mask_words: int) -> None:
        self.ll_matcher = ll_matcher
        self.mask_words = mask_words  # int32 words of one mask: ceil(tokenizer vocab / 32)
        self._logged = False

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the constraint refused it."""
        if self.ll_matcher.is_stopped():
            return False
        ok = self.ll_matcher.consume_token(token_id)
        if not ok and not self._logged:
            self._logged = True
            logger.warning("constrained decoding: token %d refused: %s", token_id, self.ll_matcher.get_error())
        return ok

    def is_stopped(self) -> bool:
        """No token but EOS can follow (the output is complete), or the
        matcher is in an error state."""
        return self.ll_matcher.is_stopped()

    def is_accepting(self) -> bool:
        """The output so far is a complete match (EOS would be allowed)."""
        return self.ll_matcher.is_accepting()

    def error(self) -> str:
        """The matcher's error message, "" when none."""
        return self.ll_matcher.get_error()
