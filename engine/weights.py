"""Build the model for a checkpoint and load its ``*.safetensors`` weights.

Tensors are matched by Hugging Face parameter name. Single files and sharded
checkpoints (``model.safetensors.index.json``) both work. Missing, unexpected
or mis-shaped tensors are errors naming the tensors.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from splitserve.engine.model_config import ModelConfig
from splitserve.engine.models.llama import LlamaForCausalLM
from splitserve.engine.models.rotary import RotaryEmbedding

# Checkpoint tensors that carry no parameters (older exports save rotary tables).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def safetensors_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint's weight files, from the shard index when there is one."""
    path = Path(model_dir)
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {str(path)!r} (.bin checkpoints are not supported)")
    return files


def build_model(config: ModelConfig, max_positions: int, dtype: torch.dtype,
                device: torch.device) -> LlamaForCausalLM:
    """An uninitialised model of ``dtype`` on ``device`` (weights still to load)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions).to(dtype)
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty unties them
    # to_empty leaves buffers uninitialised; the rotary tables are rebuilt in fp32.
    model.rotary = RotaryEmbedding(config.rope, config.head_dim, max_positions).to(device)
    return model


def load_weights(model: LlamaForCausalLM, model_dir: str | os.PathLike[str]) -> None:
    """Copy every checkpoint tensor into the parameter of the same name."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    tied = model.config.tie_word_embeddings
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                param = params.get(name)
                if param is None:
                    unexpected.append(name)
                    continue
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(
                        f"{file.name}: tensor {name} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(param.shape)} (config.json does not match the weights)"
                    )
                with torch.no_grad():
                    param.copy_(tensor)
                loaded.add(name)
    if unexpected:
        raise ValueError(
            f"{model_dir}: {len(unexpected)} unexpected tensor(s) for {model.config.architecture}: "
            f"{', '.join(sorted(unexpected)[:8])}"
        )
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{model_dir}: {len(missing)} tensor(s) missing from the checkpoint: "
                         f"{', '.join(missing[:8])}")
