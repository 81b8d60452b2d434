"""A byte-level BPE tokenizer of a real vocabulary size, for benchmarks that
need one (constrained decoding: llguidance cannot use the bench models'
word-level tokenizer, and its mask cost grows with the vocabulary's trie).

Trained in memory on the Python standard library's ``*.py`` sources (~5 MB,
present on every machine that runs the benches; ~1.5 s), so no download and
no checked-in file.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"


def byte_level_tokenizer(vocab_size: int) -> Any:
    """A ``PreTrainedTokenizerFast`` with exactly ``vocab_size`` tokens (id 0
    is ``EOS``), GPT-2-style byte-level pre-tokenizer and decoder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if not corpus:
        raise FileNotFoundError("no Python standard library sources to train the benchmark tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"the corpus gave {tok.get_vocab_size()} tokens, not {vocab_size}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
