"""Our model and runner against transformers: same logits for a varlen batch
run through the paged cache in chunks (fp32)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitserve.engine.engine_args import EngineArgs
from splitserve.engine.model_runner import load_model_runner
from splitserve.engine.request import Request
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.step_io import SchedulerOutput

BLOCK = 8


def _runner(path: Path, **kwargs: object):
    args = EngineArgs(model=str(path), device="cpu", block_size=BLOCK, max_model_len=256,
                      num_gpu_blocks_override=64, attention_backend="torch", **kwargs)
    return load_model_runner(args)


def _hf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _requests(prompts: list[list[int]]) -> list[Request]:
    out, next_block = [], 1  # block 0 stays unused so a zero-padded table entry would show
    for i, p in enumerate(prompts):
        need = -(-len(p) // BLOCK)
        # Non-contiguous, descending block ids: the slot mapping must follow block_ids.
        blocks = list(range(next_block + need - 1, next_block - 1, -1))
        next_block += need
        out.append(Request(f"r{i}", p, SamplingParams(temperature=0.0), seed=0, block_ids=blocks))
    return out


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "mistral", "qwen3"])
def test_chunked_varlen_logits_match_transformers(tiny_checkpoints: dict, family: str) -> None:
    path = tiny_checkpoints[family]
    runner = _runner(path)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 288, (n,), generator=gen).tolist() for n in (5, 37, 90)]
    reqs = _requests(prompts)
    # Step 1: first chunks (different sizes); step 2: the rest, sampling at the end.
    first = [3, 20, 90]
    runner.execute(SchedulerOutput(requests=reqs, num_scheduled_tokens=first, samples=[False, False, True]))
    for r, n in zip(reqs, first):
        r.num_computed_tokens = n
    rest = [len(p) - n for p, n in zip(prompts, first)]
    so = SchedulerOutput(requests=reqs[:2], num_scheduled_tokens=rest[:2], samples=[True, True])
    inputs = runner.prepare_inputs(so)
    hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_cache, inputs.metadata, runner.backend)
    ours = runner.model.compute_logits(hidden)
    starts = [0, rest[0]]
    for i, (r, start) in enumerate(zip(reqs[:2], starts)):
        expected = _hf_logits(path, prompts[i])[first[i]:]
        torch.testing.assert_close(ours[start:start + rest[i]], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decode_steps_match_transformers(tiny_checkpoints: dict, family: str) -> None:
    """Greedy decode through execute(): each sampled token is HF's argmax."""
    path = tiny_checkpoints[family]
    runner = _runner(path)
    prompts = [[5, 6, 7], list(range(10, 40))]
    reqs = _requests([p + [0] * 16 for p in prompts])  # room for the decoded tokens
    for r, p in zip(reqs, prompts):
        r.prompt_token_ids, r.token_ids = list(p), list(p)
    out = runner.execute(SchedulerOutput(requests=reqs, num_scheduled_tokens=[len(p) for p in prompts],
                                         samples=[True, True]))
    for _ in range(6):
        for r, tok in zip(reqs, out.sampled_token_ids):
            r.num_computed_tokens = r.num_tokens
            r.append_output_token(tok)
        out = runner.execute(SchedulerOutput(requests=reqs, num_scheduled_tokens=[1, 1], samples=[True, True]))
    for r, tok in zip(reqs, out.sampled_token_ids):
        r.append_output_token(tok)
    for r in reqs:
        logits = _hf_logits(path, r.token_ids[:-1])
        assert logits[r.num_prompt_tokens - 1:].argmax(-1).tolist() == r.output_token_ids


def test_runner_attributes(tiny_checkpoints: dict) -> None:
    runner = _runner(tiny_checkpoints["llama"])
    assert (runner.num_blocks, runner.block_size, runner.max_model_len) == (64, BLOCK, 256)
    assert runner.vocab_size == 288 and runner.eos_token_ids == {273, 275}  # end_of_text, im_end
    assert runner.kv_cache.shape == (64, 2, 2, BLOCK, 2, 16) and runner.kv_cache.is_contiguous()


def test_cache_too_small_for_one_sequence(tiny_checkpoints: dict) -> None:
    with pytest.raises(ValueError, match="needs 32"):
        load_model_runner(EngineArgs(model=str(tiny_checkpoints["llama"]), device="cpu", block_size=BLOCK,
                                     max_model_len=256, num_gpu_blocks_override=31))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_decode_inputs_fast_path_equals_the_general_one(tiny_checkpoints: dict, backend: str) -> None:
    """A CPU step of one row per sequence builds its inputs from plain lists;
    every tensor equals what the general path builds (block edges, a
    request that does not sample, non-contiguous blocks)."""
    runner = load_model_runner(EngineArgs(model=str(tiny_checkpoints["llama"]), device="cpu", block_size=BLOCK,
                                          max_model_len=256, num_gpu_blocks_override=64,
                                          attention_backend=backend))
    reqs = _requests([list(range(1, 1 + n)) for n in (1, BLOCK, BLOCK + 1, 3 * BLOCK - 1, 20)])
    for r in reqs:
        r.num_computed_tokens = r.num_tokens - 1
    so = SchedulerOutput(requests=reqs, num_scheduled_tokens=[1] * len(reqs),
                         samples=[True, True, False, True, True])
    fast, general = runner.prepare_inputs(so), runner._prepare_any(so)
    for name in ("input_ids", "positions", "sample_rows"):
        got, want = getattr(fast, name), getattr(general, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    for name in ("slot_mapping", "block_tables", "seq_lens", "query_start_loc", "cache_rows"):
        got, want = getattr(fast.metadata, name), getattr(general.metadata, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    for name in ("max_query_len", "max_seq_len", "decode_only"):
        assert getattr(fast.metadata, name) == getattr(general.metadata, name), name
    assert (fast.metadata.decode_groups is None) == (general.metadata.decode_groups is None)
