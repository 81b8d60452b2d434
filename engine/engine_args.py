"""Engine configuration with vLLM's knob names, validated once at start-up."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICES = ("auto", "cpu", "cuda")
_ATTENTION_BACKENDS = ("auto", "cpu", "torch", "triton")
DEFAULT_CPU_KV_CACHE_MEMORY = 1 << 30  # 1 GiB


@dataclass
class EngineArgs:
    """Everything needed to build one engine.

    The number of KV blocks derives from the memory budget after the weights
    load: ``kv_cache_memory`` bytes on CPU (default 1 GiB),
    ``gpu_memory_utilization`` of the device on CUDA; ``num_gpu_blocks_override``
    (vLLM's name) pins it, which tests use to force preemption.
    ``max_model_len=None`` takes the checkpoint's ``max_position_embeddings``.
    """

    model: str = ""
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None
    num_gpu_blocks_override: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    attention_backend: str = "auto"
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.device not in _DEVICES:
            raise ValueError(f"--device must be one of {', '.join(_DEVICES)}, got {self.device!r}")
        if self.attention_backend not in _ATTENTION_BACKENDS:
            raise ValueError(
                f"--attention-backend must be one of {', '.join(_ATTENTION_BACKENDS)}, "
                f"got {self.attention_backend!r}"
            )
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"--block-size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"--max-model-len must be >= 1, got {self.max_model_len}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"--kv-cache-memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"--num-gpu-blocks-override must be >= 1, got {self.num_gpu_blocks_override}")
        if not self.enable_chunked_prefill and self.max_model_len is not None:
            if self.max_num_batched_tokens < self.max_model_len:
                raise ValueError(
                    "without chunked prefill --max-num-batched-tokens "
                    f"({self.max_num_batched_tokens}) must be >= --max-model-len ({self.max_model_len})"
                )

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Add the engine knobs (vLLM spelling) to a command's parser."""
        d = EngineArgs()
        parser.add_argument("--model", help="Hugging Face model folder (config.json, *.safetensors, tokenizer)")
        parser.add_argument("--served-model-name", default=None, help="name clients use; default: --model")
        parser.add_argument("--dtype", default=d.dtype, choices=_DTYPES)
        parser.add_argument("--device", default=d.device, choices=_DEVICES)
        parser.add_argument("--max-model-len", type=int, default=None)
        parser.add_argument("--block-size", type=int, default=d.block_size)
        parser.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
        parser.add_argument("--kv-cache-memory", type=_parse_bytes, default=None,
                            help="KV cache bytes on CPU (e.g. 2GiB); default 1GiB")
        parser.add_argument("--num-gpu-blocks-override", type=int, default=None)
        parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
        parser.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
        parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                            default=d.enable_prefix_caching)
        parser.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                            default=d.enable_chunked_prefill)
        parser.add_argument("--seed", type=int, default=d.seed)
        parser.add_argument("--attention-backend", default=d.attention_backend, choices=_ATTENTION_BACKENDS)
        parser.add_argument("--enforce-eager", action="store_true")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None or k == "model"})

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)


def _parse_bytes(text: str) -> int:
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(lowered)
