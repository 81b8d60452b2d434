"""What the engine needs to know about a checkpoint, read once from ``config.json``.

Both spellings of rotary settings are accepted: hub checkpoints (Llama 3,
Qwen2.5) carry top-level ``rope_theta`` / ``rope_scaling``, while
``transformers`` 5 writes a ``rope_parameters`` dict.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitserve.engine.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPE_NAMES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16",
                "float16": "float16", "half": "float16"}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings; the llama3 fields matter only for ``rope_type='llama3'``."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder's shape, validated on construction."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    sliding_window: int | None = None
    checkpoint_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {self.rope.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str]) -> ModelConfig:
        """Read ``model_dir/config.json``; raise ``UnsupportedModelError`` for
        architectures or settings this engine cannot run."""
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: --model must be a Hugging Face model folder")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            vocab_size=int(raw["vocab_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rope=_rope_config(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias,  # Qwen2 always has q/k/v bias
            o_bias=attention_bias and not qwen2,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=_sliding_window(raw, arch),
            checkpoint_dtype=_DTYPE_NAMES.get(str(raw.get("torch_dtype") or raw.get("dtype"))),
        )

    def resolve_max_model_len(self, requested: int | None) -> int:
        """The context length to serve: ``requested`` or the checkpoint's limit.

        A sliding-window model is served only within its window (where sliding
        attention equals full attention): an unset length is capped to the
        window, a larger explicit one is refused.
        """
        limit = self.max_position_embeddings
        if requested is not None and requested > limit:
            raise ValueError(
                f"--max-model-len {requested} exceeds the model's max_position_embeddings ({limit})"
            )
        length = requested if requested is not None else limit
        if self.sliding_window is not None and self.sliding_window < length:
            if requested is not None:
                raise UnsupportedModelError(
                    f"--max-model-len {requested} exceeds the model's sliding_window ({self.sliding_window}); "
                    "sliding-window attention is not implemented, so set --max-model-len "
                    f"<= {self.sliding_window}"
                )
            logger.warning("capping max_model_len to the model's sliding_window (%d): sliding-window "
                           "attention is not implemented", self.sliding_window)
            length = self.sliding_window
        return length


def resolve_dtype(requested: str, checkpoint_dtype: str | None, device: str) -> str:
    """The compute dtype name: 'auto' is the checkpoint's on CUDA (bfloat16 if
    unknown) and float32 on CPU; an explicit choice always wins."""
    if requested != "auto":
        return requested
    if device == "cpu":
        return "float32"
    return checkpoint_dtype or "bfloat16"


def _rope_config(raw: dict[str, Any]) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    original = merged.get("original_max_position_embeddings")
    return RopeConfig(
        theta=float(theta),
        rope_type=str(rope_type),
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original) if original is not None else None,
    )


def _sliding_window(raw: dict[str, Any], arch: str) -> int | None:
    window = raw.get("sliding_window")
    if window is None:
        return None
    # Qwen2/3 configs carry a window but use it only when use_sliding_window is set.
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not raw.get("use_sliding_window", False):
        return None
    return int(window)
