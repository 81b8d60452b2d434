"""Tiny random checkpoints of each supported family, written with transformers.

``save_pretrained`` of transformers 5 writes the ``rope_parameters`` spelling;
the built-in tiny model (``splitserve.engine.tiny_model``) covers the hub
spelling (top-level ``rope_theta``). Every builder is seeded and fp32, and
writes the built-in byte-level tokenizer next to the weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from splitserve.engine.tiny_model import BEGIN_OF_TEXT, END_OF_TEXT, tokenizer_vocab, write_tokenizer

VOCAB = 288  # the built-in byte-level tokenizer's 276 tokens, padded
_IDS = tokenizer_vocab()
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
    bos_token_id=_IDS[BEGIN_OF_TEXT], eos_token_id=_IDS[END_OF_TEXT], pad_token_id=_IDS[END_OF_TEXT],
)
# Larger than HF's default init (0.02) so the random models have peaked
# distributions: greedy ties between near-equal logits would make
# exactness tests flaky under harmless fp32 reordering.
_INIT_STD = 0.2


def _save(model_cls: Any, config: Any, out: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, _INIT_STD)
    model.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    write_tokenizer(out)
    return out


def llama(out: Path, *, llama3_rope: bool = False, tie: bool = False, seed: int = 0,
          max_position_embeddings: int | None = None, head_dim: int | None = None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    if llama3_rope:
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    common = {**_COMMON, **({"max_position_embeddings": max_position_embeddings} if max_position_embeddings else {})}
    config = LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=tie,
                         **({"head_dim": head_dim} if head_dim else {}))
    return _save(LlamaForCausalLM, config, out, seed)


def qwen2(out: Path, *, seed: int = 0, head_dim: int | None = None) -> Path:
    """``head_dim`` overrides hidden_size / heads (64 suits the Triton kernels)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**_COMMON, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                         "rope_theta": 1000000.0}, **({"head_dim": head_dim} if head_dim else {}))
    return _save(Qwen2ForCausalLM, config, out, seed)


def mistral(out: Path, *, seed: int = 0, sliding_window: int | None = None) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**{**_COMMON, "num_key_value_heads": 1}, sliding_window=sliding_window, head_dim=32)
    return _save(MistralForCausalLM, config, out, seed)


def qwen3(out: Path, *, seed: int = 0) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**_COMMON, head_dim=16, tie_word_embeddings=True)
    return _save(Qwen3ForCausalLM, config, out, seed)


BUILDERS = {"llama": llama, "llama3": lambda out: llama(out, llama3_rope=True), "qwen2": qwen2,
            "mistral": mistral, "qwen3": qwen3}


def build_all(root: Path) -> dict[str, Path]:
    """Every family under ``root/<name>``."""
    return {name: build(root / name) for name, build in BUILDERS.items()}
