"""Random-weight checkpoints for the engine benchmarks.

The benchmark model is a ~56M-parameter Llama (hidden 512, 8 layers, 8 heads,
4 KV heads -> head_dim 64, intermediate 1408, vocab 32000, untied embeddings),
deterministic from a seed, in fp32 and bf16. It is written with
``save_pretrained`` (safetensors) together with a word-level tokenizer
(``tokenizer.json``, a chat template) that transformers and vLLM both load
offline. Checkpoints are cached under ``~/.cache/splitserve/bench-models/``
(``SPLITSERVE_BENCH_MODELS`` overrides); a ``.complete`` marker holds the spec
so a changed spec is rebuilt, and a half-written folder is never used.

CLI: ``python bench/bench_models.py [--dtype float32 bfloat16] [--seed 0]``
prints the folders.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import FIRST_ORDINARY_TOKEN_ID, WORDS  # noqa: E402

DTYPES = ("float32", "bfloat16")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_MARKER = ".complete"


@dataclass(frozen=True)
class BenchModelSpec:
    """Shape and seed of a random Llama benchmark checkpoint."""

    name: str = "llama-56m"
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    intermediate_size: int = 1408
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_parameters(self) -> int:
        h, i, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        kv = self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        embeddings = v * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + embeddings + h


LLAMA_56M = BenchModelSpec()
# ~0.5B, Llama-3-like head_dim 128 with GQA 10/2, for GPU throughput (bench/gpu_check.sh).
LLAMA_0_5B = BenchModelSpec(name="llama-0.5b", hidden_size=1280, num_hidden_layers=24, num_attention_heads=10,
                            num_key_value_heads=2, intermediate_size=3456)
BENCH_MODELS = {spec.name: spec for spec in (LLAMA_56M, LLAMA_0_5B)}


def default_cache_dir() -> Path:
    env = os.environ.get("SPLITSERVE_BENCH_MODELS")
    return Path(env) if env else Path.home() / ".cache" / "splitserve" / "bench-models"


def model_dir(spec: BenchModelSpec, dtype: str, cache_dir: Path | None = None) -> Path:
    """Where ``spec`` in ``dtype`` is (or will be) cached."""
    _check_dtype(dtype)
    short = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    return (cache_dir or default_cache_dir()) / f"{spec.name}-{short}-seed{spec.seed}"


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {DTYPES}")


def _marker_text(spec: BenchModelSpec, dtype: str) -> str:
    return json.dumps({"spec": asdict(spec), "dtype": dtype}, sort_keys=True)


def is_built(path: Path, spec: BenchModelSpec, dtype: str) -> bool:
    marker = path / _MARKER
    return marker.is_file() and marker.read_text() == _marker_text(spec, dtype)


def ensure_bench_model(
    dtype: str = "float32", spec: BenchModelSpec = LLAMA_56M, cache_dir: Path | None = None
) -> Path:
    """Return the folder of ``spec`` in ``dtype``, building it on first use."""
    path = model_dir(spec, dtype, cache_dir)
    if is_built(path, spec, dtype):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write_model(tmp, spec, dtype)
        (tmp / _MARKER).write_text(_marker_text(spec, dtype))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_model(out: Path, spec: BenchModelSpec, dtype: str) -> None:
    """Write config, random weights (seeded) and tokenizer for ``spec`` into ``out``."""
    _check_dtype(dtype)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if spec.hidden_size % spec.num_attention_heads:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    config = LlamaConfig(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        intermediate_size=spec.intermediate_size,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        rms_norm_eps=spec.rms_norm_eps,
        initializer_range=spec.initializer_range,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    # Initialise in fp32 on CPU under a fixed seed, then cast: the bf16
    # checkpoint is the fp32 one rounded, so the two variants match.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out, spec.vocab_size)


def tokenizer_vocab(vocab_size: int) -> dict[str, int]:
    """Special tokens, role markers, :data:`WORDS`, then filler ``w<id>`` tokens up to ``vocab_size``."""
    head = list(SPECIAL_TOKENS) + list(ROLE_TOKENS)
    head += [f"<reserved_{i}>" for i in range(len(head), FIRST_ORDINARY_TOKEN_ID)]
    tokens = head + list(dict.fromkeys(WORDS))
    if len(tokens) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(tokens)} fixed tokens")
    tokens += [f"w{i}" for i in range(len(tokens), vocab_size)]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A whitespace word-level tokenizer (one token per word of the bench workloads)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=tokenizer_vocab(vocab_size), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + ROLE_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build/cached random Llama benchmark checkpoints.")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    spec = BenchModelSpec(seed=args.seed)
    for dtype in args.dtype:
        print(ensure_bench_model(dtype, spec, args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
