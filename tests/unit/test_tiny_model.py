"""The built-in tiny checkpoint: deterministic bytes, a working tokenizer, loadable by transformers."""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from splitserve.cli import main as cli_main
from splitserve.engine.tiny_model import IM_END, IM_START, END_OF_TEXT, TinyModelSpec, write_tiny_model
from splitserve.engine.tokenizer import eos_token_ids, load_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_cli_writes_identical_bytes(tiny_dir: Path, tmp_path: Path) -> None:
    assert cli_main(["model", "tiny", "--out", str(tmp_path / "again")]) == 0
    assert _digests(tmp_path / "again") == _digests(tiny_dir)


def test_folder_is_readable_by_other_uids(tmp_path: Path) -> None:
    previous = os.umask(0o077)  # even a strict umask leaves it world-readable
    try:
        out = write_tiny_model(tmp_path / "model")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    files = sorted(out.iterdir())
    assert files and {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o644}


def test_other_seed_changes_weights(tiny_dir: Path, tmp_path: Path) -> None:
    other = write_tiny_model(tmp_path / "other", TinyModelSpec(seed=1))
    assert _digests(other)["model.safetensors"] != _digests(tiny_dir)["model.safetensors"]
    assert _digests(other)["tokenizer.json"] == _digests(tiny_dir)["tokenizer.json"]


def test_byte_level_round_trip_and_chat_template(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    text = "hello the world, héllo 日本語 🙂\n\ttabs"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert max(ids) < len(tok) <= json.loads((tiny_dir / "config.json").read_text())["vocab_size"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   return_dict=False)
    assert tok.decode(chat) == f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n"
    assert chat[0] == tok.convert_tokens_to_ids(IM_START)


def test_eos_ids_union_of_configs_and_tokenizer(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    ids = eos_token_ids(tiny_dir, tok)
    assert ids == {tok.convert_tokens_to_ids(END_OF_TEXT), tok.convert_tokens_to_ids(IM_END)}


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_transformers_loads_it(tiny_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, TinyModelSpec().vocab_size)
    assert torch.isfinite(logits).all()


def test_engine_generates_what_transformers_generates(tiny_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from splitserve.engine import LLM, SamplingParams

    llm = LLM(str(tiny_dir), device="cpu", max_model_len=256, num_gpu_blocks_override=32)
    prompt = load_tokenizer(tiny_dir).apply_chat_template([{"role": "user", "content": "hello there"}],
                                                          add_generation_prompt=True, return_dict=False)
    ours = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=8,
                                                                      ignore_eos=True))[0].outputs[0].token_ids
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    ids = torch.tensor([prompt])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         eos_token_id=None)[0, len(prompt):].tolist()
    assert ours == ref
    llm.engine_core.check_no_leaks()
