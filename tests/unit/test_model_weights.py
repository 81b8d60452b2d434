"""Weight loading (single file, sharded, bad tensors) and KV cache sizing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitserve.engine.engine_args import EngineArgs
from splitserve.engine.kv_cache import KVCacheSpec, determine_num_blocks
from splitserve.engine.model_config import ModelConfig
from splitserve.engine.weights import build_model, load_weights

CPU = torch.device("cpu")


def _model(path: Path):
    config = ModelConfig.from_pretrained(path)
    return build_model(config, 64, torch.float32, CPU)


def _copy_without_weights(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    return dst


def test_sharded_checkpoint_loads_like_the_single_file(tiny_checkpoints: dict, tmp_path: Path) -> None:
    src = tiny_checkpoints["llama"]
    tensors = load_file(str(src / "model.safetensors"))
    sharded = _copy_without_weights(src, tmp_path / "sharded")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / file))
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    one, two = _model(src), _model(sharded)
    load_weights(one, src)
    load_weights(two, sharded)
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(one.model.layers[1].mlp.up_proj.weight, tensors["model.layers.1.mlp.up_proj.weight"])


def test_tied_embeddings_share_one_tensor(tiny_checkpoints: dict) -> None:
    model = _model(tiny_checkpoints["qwen2"])
    load_weights(model, tiny_checkpoints["qwen2"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_missing_and_unexpected_tensors_are_named(tiny_checkpoints: dict, tmp_path: Path) -> None:
    src = tiny_checkpoints["llama"]
    tensors = load_file(str(src / "model.safetensors"))
    missing = _copy_without_weights(src, tmp_path / "missing")
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, str(missing / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*model.norm.weight"):
        load_weights(_model(missing), missing)
    extra = _copy_without_weights(src, tmp_path / "extra")
    save_file({**tensors, "model.layers.0.mystery.weight": torch.zeros(2)}, str(extra / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected.*mystery"):
        load_weights(_model(extra), extra)
    empty = _copy_without_weights(src, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_weights(_model(empty), empty)


def test_kv_blocks_from_cpu_budget_and_override() -> None:
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32)
    assert spec.block_bytes == 2 * 2 * 16 * 2 * 16 * 4
    args = EngineArgs(kv_cache_memory=100 * spec.block_bytes + 5)
    assert determine_num_blocks(args, spec, CPU, max_model_len=256) == 100
    assert determine_num_blocks(EngineArgs(num_gpu_blocks_override=7), spec, CPU, max_model_len=100) == 7
    default = determine_num_blocks(EngineArgs(), spec, CPU, max_model_len=256)
    assert default == (1 << 30) // spec.block_bytes
    with pytest.raises(ValueError, match="--kv-cache-memory"):
        determine_num_blocks(EngineArgs(kv_cache_memory=spec.block_bytes), spec, CPU, max_model_len=256)
