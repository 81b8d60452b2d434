"""config.json parsing: architectures, both rope spellings, GQA/head_dim, bias, sliding window, dtype."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitserve.engine.errors import UnsupportedModelError
from splitserve.engine.model_config import ModelConfig, RopeConfig, resolve_dtype
from splitserve.engine.models.rotary import inverse_frequencies

BASE = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def test_hub_spelling_top_level_rope_theta_and_scaling() -> None:
    cfg = ModelConfig.from_dict({**BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA3,
                                 "torch_dtype": "bfloat16"})
    assert cfg.rope == RopeConfig(500000.0, "llama3", 8.0, 1.0, 4.0, 8192)
    assert cfg.checkpoint_dtype == "bfloat16" and cfg.head_dim == 16 and cfg.num_kv_heads == 2


def test_transformers5_spelling_rope_parameters(tiny_checkpoints: dict) -> None:
    raw = json.loads((tiny_checkpoints["llama3"] / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_theta" not in raw
    cfg = ModelConfig.from_pretrained(tiny_checkpoints["llama3"])
    assert cfg.rope == RopeConfig(500000.0, "llama3", 8.0, 1.0, 4.0, 64)
    assert ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}).rope \
        == RopeConfig(theta=7.0)


def test_legacy_scaling_type_key_and_linear() -> None:
    cfg = ModelConfig.from_dict({**BASE, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert cfg.rope.rope_type == "linear"
    base = inverse_frequencies(RopeConfig(), 16)
    torch.testing.assert_close(inverse_frequencies(cfg.rope, 16), base / 2)


def test_llama3_scaling_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fields = {k: v for k, v in BASE.items() if k != "architectures"}
    hf = LlamaConfig(**{**fields, "max_position_embeddings": 16384},
                     rope_parameters={"rope_theta": 500000.0, **LLAMA3})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = inverse_frequencies(RopeConfig(500000.0, "llama3", 8.0, 1.0, 4.0, 8192), 16)
    torch.testing.assert_close(ours, expected.float())
    assert not torch.allclose(ours, inverse_frequencies(RopeConfig(500000.0), 16))


def test_unsupported_architecture_names_it_and_the_supported_list() -> None:
    with pytest.raises(UnsupportedModelError, match=r"'GPT2LMHeadModel'.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        ModelConfig.from_dict({**BASE, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError, match="rope type 'yarn'"):
        ModelConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(Path("/nonexistent"))


def test_families(tiny_checkpoints: dict) -> None:
    qwen = ModelConfig.from_pretrained(tiny_checkpoints["qwen2"])
    assert qwen.qkv_bias and not qwen.o_bias and qwen.tie_word_embeddings and qwen.sliding_window is None
    mistral = ModelConfig.from_pretrained(tiny_checkpoints["mistral"])
    assert (mistral.head_dim, mistral.num_kv_heads, mistral.qkv_bias) == (32, 1, False)
    assert ModelConfig.from_dict({**BASE, "architectures": ["Qwen3ForCausalLM"]}).qk_norm


def test_sliding_window_caps_or_refuses() -> None:
    cfg = ModelConfig.from_dict({**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 256})
    assert cfg.resolve_max_model_len(None) == 256
    assert cfg.resolve_max_model_len(200) == 200
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        cfg.resolve_max_model_len(512)
    qwen = ModelConfig.from_dict({**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 256,
                                  "use_sliding_window": False})
    assert qwen.resolve_max_model_len(None) == 1024
    with pytest.raises(ValueError, match="max_position_embeddings"):
        qwen.resolve_max_model_len(2048)


def test_dtype_resolution() -> None:
    assert resolve_dtype("auto", "bfloat16", "cpu") == "float32"
    assert resolve_dtype("auto", "bfloat16", "cuda") == "bfloat16"
    assert resolve_dtype("auto", None, "cuda") == "bfloat16"
    assert resolve_dtype("float16", "bfloat16", "cpu") == "float16"
