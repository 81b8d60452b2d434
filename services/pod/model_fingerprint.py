"""A model's identity for the KV handshake: two pods may exchange KV blocks
only if they run the same weights in the same dtype."""
from __future__ import annotations

import hashlib
from pathlib import Path


def model_fingerprint(model_dir: str | Path, dtype: str) -> str:
    """sha256 (hex) over ``config.json``'s bytes, the resolved ``dtype`` name
    and the names and sizes of the ``*.safetensors`` files.

    Sizes, not contents: hashing gigabytes at every start would slow pods
    down, and a re-saved checkpoint with identical config and shard sizes is
    the same model for KV purposes. Raises ``FileNotFoundError`` naming the
    folder when it has no config.json.
    """
    folder = Path(model_dir)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; is --model a Hugging Face model folder?")
    digest = hashlib.sha256()
    digest.update(b"config.json\0")
    digest.update(config.read_bytes())
    digest.update(b"\0dtype\0" + dtype.encode())
    for shard in sorted(folder.glob("*.safetensors")):
        digest.update(f"\0{shard.name}\0{shard.stat().st_size}".encode())
    return digest.hexdigest()
