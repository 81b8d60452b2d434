"""The engine's constrained-decoding state: the tokenizer llguidance needs and
compiled grammars, both made on first use.

An engine whose requests carry no constraint never touches this beyond
constructing it: no tokenizer load, no llguidance import.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.structured.constraint import Constraint
from splitserve.engine.structured.grammar import build_grammar, error_summary, ll_tokenizer
from splitserve.engine.structured.matcher import RequestMatcher

if TYPE_CHECKING:
    import llguidance

HFTokenizerLoader = Callable[[], Any]
"""Returns the model's Hugging Face tokenizer; raises ``FileNotFoundError``
(or ``OSError``) when there is none."""


class StructuredOutputManager:
    """Builds one ``RequestMatcher`` per constrained request.

    ``prepare`` (any thread) loads the tokenizer and compiles the
    constraint's grammar into a cached template matcher; ``new_matcher``
    (engine thread, from ``EngineCore.add_request``) copies the template and
    replays the request's output tokens so far, so a decode pod continuing
    from a prefill pod's first token, a recompute or a failover resumes the
    constraint where the stream stood. Both raise ``InvalidRequestError`` and
    keep nothing for a constraint that does not compile.
    """

    def __init__(self, load_hf_tokenizer: HFTokenizerLoader, vocab_size: int,
                 eos_token_ids: Iterable[int] = (), max_cached_grammars: int = 256) -> None:
        self._load_hf_tokenizer = load_hf_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_cached_grammars = max_cached_grammars
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_error: str | None = None
        self._templates: OrderedDict[Constraint, llguidance.LLMatcher] = OrderedDict()

    @property
    def tokenizer_loaded(self) -> bool:
        return self._tokenizer is not None

    def offer_tokenizer(self, hf_tokenizer: Any) -> None:
        """Use an already loaded Hugging Face tokenizer instead of loading one
        on the first constrained request (the offline ``LLM`` has one)."""
        if hf_tokenizer is not None:
            self._load_hf_tokenizer = lambda: hf_tokenizer

    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's tokenizer, built on the first call (thread-safe)."""
        with self._lock:
            return self._tokenizer_locked()

    def prepare(self, constraint: Constraint) -> None:
        """Compile ``constraint`` into the cache (thread-safe; a service may
        call it off the engine thread so a slow compile does not stall the
        step loop)."""
        self._template(constraint)

    def new_matcher(self, constraint: Constraint, output_token_ids: Sequence[int] = ()) -> RequestMatcher:
        """A matcher that has consumed ``output_token_ids``. Raises
        ``InvalidRequestError`` when they do not follow the constraint or
        already complete it (nothing would be left to generate)."""
        ll = self._template(constraint).deep_copy()
        for index, token in enumerate(output_token_ids):
            if not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise InvalidRequestError(f"output token id {token!r} is outside the vocabulary [0, {self.vocab_size})")
            if not ll.consume_token(token):
                raise InvalidRequestError(
                    f"output token {index} (id {token}) of the request does not follow its "
                    f"{constraint.kind.value} constraint: {error_summary(ll.get_error(), constraint)}"
                )
        if output_token_ids and ll.is_stopped():
            raise InvalidRequestError(
                f"the {len(output_token_ids)} output tokens already complete the {constraint.kind.value} "
                "constraint: nothing left to generate"
            )
        return RequestMatcher(ll, (self.tokenizer().vocab_size + 31) // 32)

    # -- internals ----------------------------------------------------------

    def _template(self, constraint: Constraint) -> llguidance.LLMatcher:
        with self._lock:
            template = self._templates.get(constraint)
            if template is not None:
                self._templates.move_to_end(constraint)
                return template
            tokenizer = self._tokenizer_locked()
        # Compile outside the lock (llguidance drops the GIL; it may take
        # 100 ms+ for a large schema); two threads may both compile once.
        template = _compile(constraint, tokenizer)
        with self._lock:
            self._templates[constraint] = template
            self._templates.move_to_end(constraint)
            while len(self._templates) > self.max_cached_grammars:
                self._templates.popitem(last=False)
        return template

    def _tokenizer_locked(self) -> llguidance.LLTokenizer:
        if self._tokenizer is not None:
            return self._tokenizer
        if self._tokenizer_error is not None:
            raise InvalidRequestError(self._tokenizer_error)
        try:
            hf = self._load_hf_tokenizer()
        except (OSError, ValueError) as exc:
            self._tokenizer_error = f"constrained decoding needs the model's tokenizer: {exc}"
            raise InvalidRequestError(self._tokenizer_error) from None
        try:
            self._tokenizer = ll_tokenizer(hf, self.vocab_size, self.eos_token_ids)
        except InvalidRequestError as exc:
            self._tokenizer_error = str(exc)
            raise
        return self._tokenizer


def _compile(constraint: Constraint, tokenizer: llguidance.LLTokenizer) -> llguidance.LLMatcher:
    import llguidance

    matcher = llguidance.LLMatcher(tokenizer, build_grammar(constraint), log_level=0)
    if matcher.is_error():
        raise InvalidRequestError(
            f"invalid {constraint.kind.value} constraint: {error_summary(matcher.get_error(), constraint)}")
    return matcher
