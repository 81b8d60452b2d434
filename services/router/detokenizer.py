"""Incremental detokenization of one output sequence, vLLM-style.

Decoding token by token is wrong for byte-level and SentencePiece vocabularies:
one character may span several tokens (multi-byte UTF-8), and a token's text
may depend on its left neighbour (leading-space handling). As vLLM does, we
keep two offsets into the ids: text is re-decoded from ``prefix_offset`` and
only the part after ``read_offset`` is new; while the tail decodes to an
incomplete character (U+FFFD at the end) nothing is emitted.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

# Prompt tokens used as left context, as vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET.
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class TextDecoder(Protocol):
    """What turning output ids into text needs (a tokenizer, a ``TokenText``)."""

    eos_token_id: int | None

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class Tokenizer(TextDecoder, Protocol):
    """The slice of a Hugging Face tokenizer the router uses."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def ids_decoder(tokenizer: Tokenizer) -> Callable[[list[int], bool], str]:
    """``tokenizer.decode(ids, skip_special_tokens=...)`` for a list of ids.

    A transformers tokenizer over a Rust ``tokenizers`` backend whose decode
    adds nothing to the backend's (no clean-up of spaces) is called directly:
    the same text at a third of the cost, which counts on the router's
    per-token path. Anything else goes through ``tokenizer.decode``.
    """
    backend: Any = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and _decodes_as_backend(tokenizer, backend):
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


def _decodes_as_backend(tokenizer: Any, backend: Any) -> bool:
    try:
        from tokenizers import Tokenizer as RustTokenizer
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    if not isinstance(backend, RustTokenizer) or not isinstance(tokenizer, TokenizersBackend):
        return False
    if type(tokenizer).decode is not TokenizersBackend.decode or type(tokenizer)._decode is not TokenizersBackend._decode:
        return False
    if not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return True
    # transformers skips the clean-up for BPE unless told to corrupt the output.
    return (type(backend.model).__name__ == "BPE" and getattr(
        tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", True) is False)


class TokenText:
    """A tokenizer's ``decode`` and ``eos_token_id``, prepared once for the
    router's per-token work (``ids_decoder``; transformers resolves
    ``eos_token_id`` through ``__getattr__`` on every read). Stands in for the
    tokenizer wherever only those two are used."""

    __slots__ = ("_decode_ids", "eos_token_id")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._decode_ids = ids_decoder(tokenizer)
        self.eos_token_id: int | None = tokenizer.eos_token_id

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._decode_ids(token_ids if isinstance(token_ids, list) else list(token_ids),
                                skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas.

    Feed ids with ``add``; each call returns the newly completed text (maybe
    ""). ``flush`` returns text held back at the end (an incomplete UTF-8
    sequence decodes to U+FFFD, as a full decode would). The concatenation of
    all deltas equals ``tokenizer.decode(output_ids)`` for byte-level
    vocabularies.
    """

    def __init__(self, tokenizer: TextDecoder, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_context = len(context)

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def add(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if not final and (len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT)):
            return ""
        # A context that itself ended mid-character decodes differently once
        # completed; then the common prefix is what was already emitted.
        if not full_text.startswith(prefix_text):
            prefix_text = prefix_text.rstrip(_REPLACEMENT)
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text):]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)
