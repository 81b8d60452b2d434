"""Tokenizer and end-of-sequence ids of a local Hugging Face model folder."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from splitserve.engine.errors import UnsupportedModelError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(model_dir: str | os.PathLike[str]) -> Any:
    """``AutoTokenizer`` from local files only (never the network).

    Raises ``FileNotFoundError`` when the folder is missing or holds no
    tokenizer files, naming what was looked for.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist")
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {str(path)!r}: expected one of {', '.join(_TOKENIZER_FILES)}"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def eos_token_ids(model_dir: str | os.PathLike[str], tokenizer: Any = None) -> frozenset[int]:
    """Every token id that ends generation, as vLLM counts them.

    The union of ``generation_config.json``'s and ``config.json``'s
    ``eos_token_id`` (an int or a list) and the tokenizer's ``eos_token_id``.
    """
    path = Path(model_dir)
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.exists():
            ids.update(_as_ids(json.loads(file.read_text()).get("eos_token_id"), file))
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _as_ids(value: object, file: Path) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise UnsupportedModelError(f"{file}: eos_token_id must be an integer or a list of integers, got {value!r}")
