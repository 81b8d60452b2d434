"""The built-in tiny Llama checkpoint: random weights, a byte-level tokenizer.

``write_tiny_model(out_dir)`` writes a complete Hugging Face model folder
(``config.json``, ``generation_config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``) that both splitserve and
``transformers`` load offline. Everything is derived from a seed, so the bytes
are identical on every machine: the local mode (``splitserve up`` with no
``--model``) and tests rely on that. The text it generates is gibberish.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BEGIN_OF_TEXT, END_OF_TEXT, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A handful of English merges so common words take fewer tokens; the order is
# the merge priority. Each merged piece must be a token itself.
_MERGES = (
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"),
    ("o", "n"), ("Ġ", "a"), ("r", "e"), ("Ġ", "s"), ("o", "u"), ("Ġ", "w"),
    ("e", "n"), ("i", "s"), ("Ġ", "c"), ("a", "t"),
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and seed of the tiny checkpoint (vocab is padded past the tokenizer)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # Explicit, not hidden // heads: 64 is the smallest head size the Triton
    # kernels take, so the tiny model runs the same attention path on a GPU.
    head_dim: int = 64
    intermediate_size: int = 256
    vocab_size: int = 320
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.05
    seed: int = 0


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def tokenizer_vocab() -> dict[str, int]:
    """Byte tokens (ids 0..255 in byte order), merged pieces, then special tokens."""
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    for left, right in _MERGES:
        vocab.setdefault(left + right, len(vocab))
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return vocab


def write_tokenizer(out_dir: str | os.PathLike[str]) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (ChatML template)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    out = Path(out_dir)
    vocab = tokenizer_vocab()
    ordinary = {t: i for t, i in vocab.items() if t not in SPECIAL_TOKENS}
    tok = Tokenizer(models.BPE(vocab=ordinary, merges=list(_MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BEGIN_OF_TEXT,
        "eos_token": IM_END,
        "pad_token": END_OF_TEXT,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": TinyModelSpec().max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def model_config(spec: TinyModelSpec) -> dict[str, object]:
    """The ``config.json`` contents (hub spelling: top-level ``rope_theta``)."""
    vocab = tokenizer_vocab()
    if spec.vocab_size < len(vocab):
        raise ValueError(f"vocab_size {spec.vocab_size} is smaller than the tokenizer ({len(vocab)} tokens)")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": spec.vocab_size,
        "bos_token_id": vocab[BEGIN_OF_TEXT],
        "eos_token_id": [vocab[END_OF_TEXT], vocab[IM_END]],
        "pad_token_id": vocab[END_OF_TEXT],
        "torch_dtype": "float32",
        "initializer_range": spec.init_std,
        "use_cache": True,
    }


def random_weights(spec: TinyModelSpec) -> dict[str, object]:
    """HF-named fp32 tensors drawn from one seeded generator, in a fixed order."""
    import torch

    gen = torch.Generator().manual_seed(spec.seed)
    h, q = spec.hidden_size, spec.num_attention_heads * spec.head_dim
    kv = spec.num_key_value_heads * spec.head_dim

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * spec.init_std

    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(spec.vocab_size, h)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = torch.ones(h)
        tensors[p + "self_attn.q_proj.weight"] = normal(q, h)
        tensors[p + "self_attn.k_proj.weight"] = normal(kv, h)
        tensors[p + "self_attn.v_proj.weight"] = normal(kv, h)
        tensors[p + "self_attn.o_proj.weight"] = normal(h, q)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h)
        tensors[p + "mlp.gate_proj.weight"] = normal(spec.intermediate_size, h)
        tensors[p + "mlp.up_proj.weight"] = normal(spec.intermediate_size, h)
        tensors[p + "mlp.down_proj.weight"] = normal(h, spec.intermediate_size)
    tensors["model.norm.weight"] = torch.ones(h)
    tensors["lm_head.weight"] = normal(spec.vocab_size, h)
    return tensors


def write_tiny_model(out_dir: str | os.PathLike[str], spec: TinyModelSpec | None = None) -> Path:
    """Write the tiny checkpoint into ``out_dir`` (created; existing files replaced).

    The folder is assembled next to ``out_dir`` and renamed into place, so a
    concurrent reader never sees half a checkpoint. It is readable by every
    uid (folder 0755, files 0644, whatever the umask): an image writes it as
    root and serves it as another user. Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        config = model_config(spec)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                      "pad_token_id": config["pad_token_id"], "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        save_file(random_weights(spec), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_tokenizer(tmp)
        (tmp / "splitserve_tiny.json").write_text(json.dumps(asdict(spec), sort_keys=True) + "\n")
        for path in tmp.iterdir():
            path.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp made it 0700
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
