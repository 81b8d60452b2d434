"""Constrained decoding through the real engine on tiny random checkpoints:
the deployment guide's JSON-schema example, stop states, bad constraints,
and what unconstrained requests do not pay. Every test ends leak-free."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from structured_examples import BOUNDED_MAX_BYTES
from structured_fixtures import BOUNDED_GUIDE_SCHEMA, GUIDE_SCHEMA, is_valid_prefix, manager_for, text_prompts
from test_scheduler_fakes import make_core

from splitserve.engine import LLM, SamplingParams
from splitserve.engine.engine_args import EngineArgs
from splitserve.engine.engine_core import EngineCore
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.model_runner import load_model_runner
from splitserve.engine.structured import Constraint
from splitserve.engine.tiny_model import write_tiny_model

ARGS = dict(device="cpu", block_size=8, max_model_len=512, num_gpu_blocks_override=2048)


@pytest.fixture(scope="module")
def tiny_builtin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _model(name: str, tiny_checkpoints: dict, tiny_builtin: Path) -> Path:
    return tiny_builtin if name == "builtin" else tiny_checkpoints[name]


@pytest.mark.parametrize("family", ["llama", "qwen2", "builtin"])
def test_guide_example_50_prompts_greedy_and_sampled_all_validate(tiny_checkpoints: dict, tiny_builtin: Path,
                                                                  family: str) -> None:
    llm = LLM(str(_model(family, tiny_checkpoints, tiny_builtin)), **ARGS)
    prompts = text_prompts(50)
    assert max(len(llm.tokenizer.encode(p)) for p in prompts) + BOUNDED_MAX_BYTES < ARGS["max_model_len"]
    runs = {
        "greedy": SamplingParams(temperature=0.0, max_tokens=BOUNDED_MAX_BYTES, constraint=Constraint.json_schema(
            BOUNDED_GUIDE_SCHEMA, disable_any_whitespace=True, disable_additional_properties=True)),
        "sampled": SamplingParams(temperature=0.9, top_p=0.95, seed=3, max_tokens=BOUNDED_MAX_BYTES,
                                  constraint=Constraint.json_schema(BOUNDED_GUIDE_SCHEMA, whitespace_pattern="[ ]?",
                                                                    disable_additional_properties=True)),
    }
    for name, params in runs.items():
        outs = llm.generate(prompts, params)
        texts = []
        for i, out in enumerate(outs):
            completion = out.outputs[0]
            assert completion.finish_reason == "stop", f"{name} prompt {i}: {completion.text!r}"
            value = json.loads(completion.text)
            jsonschema.validate(value, GUIDE_SCHEMA)
            jsonschema.validate(value, BOUNDED_GUIDE_SCHEMA)
            texts.append(completion.text)
        assert len(set(texts)) > 1, f"{name}: the prompts should not all give the same output"
    assert any(json.loads(t)["entities"] for t in texts)
    llm.engine_core.check_no_leaks()


def test_guide_example_as_sent_stops_valid_or_stays_a_valid_prefix(tiny_checkpoints: dict) -> None:
    """The unbounded schema with vLLM's default options: random weights may
    never close a string, so an output cut by max_tokens must still be a
    prefix the schema allows; every finished one validates."""
    path = tiny_checkpoints["qwen2"]
    llm = LLM(str(path), **ARGS)
    constraint = Constraint.json_schema(GUIDE_SCHEMA)
    checker = manager_for(path, llm.engine_core.runner.vocab_size)
    for params in (SamplingParams(temperature=0.0, max_tokens=96, constraint=constraint),
                   SamplingParams(temperature=1.0, seed=5, max_tokens=96, constraint=constraint)):
        outs = llm.generate(text_prompts(50, seed=1), params)
        finished = 0
        for out in outs:
            completion = out.outputs[0]
            if completion.finish_reason == "stop":
                jsonschema.validate(json.loads(completion.text), GUIDE_SCHEMA)
                finished += 1
            else:
                assert completion.finish_reason == "length" and len(completion.token_ids) == 96
                assert is_valid_prefix(checker, constraint, completion.token_ids)
        assert finished > 0
    llm.engine_core.check_no_leaks()


def test_stop_state_ends_the_request_without_eos(tiny_checkpoints: dict) -> None:
    llm = LLM(str(tiny_checkpoints["llama"]), **ARGS)
    tok = llm.tokenizer
    prompts = text_prompts(6, seed=2)
    cases = [(Constraint.choice(["positive", "negative", "neutral"]), lambda t: t in ("positive", "negative", "neutral")),
             (Constraint.regex(r"[0-9]{3}-[a-z]{2}"), lambda t: len(t) == 6 and t[3] == "-"),
             (Constraint.grammar('start: "call(" NAME ")"\nNAME: /[a-z]{1,4}/'), lambda t: t.startswith("call("))]
    for constraint, check in cases:
        params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, constraint=constraint, logprobs=1)
        for out in llm.generate(prompts, params):
            completion = out.outputs[0]
            assert completion.finish_reason == "stop" and check(completion.text), completion.text
            assert tok.decode(completion.token_ids) == completion.text  # no eos token at the end
            assert len(completion.logprobs) == len(completion.token_ids)
            assert all(lp.rank == 1 for lp in completion.logprobs)  # greedy: the best allowed token
    llm.engine_core.check_no_leaks()


def test_bad_constraint_is_refused_readably_and_nothing_is_held(tiny_checkpoints: dict) -> None:
    llm = LLM(str(tiny_checkpoints["llama"]), **ARGS)
    good = SamplingParams(temperature=0.0, max_tokens=4)
    bad = SamplingParams(temperature=0.0, max_tokens=4, constraint=Constraint.json_schema(
        {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["n"]}))
    with pytest.raises(InvalidRequestError, match="invalid json_schema constraint: Unsatisfiable schema: required property 'n'"):
        llm.generate(["first prompt", "second prompt"], [good, bad])
    assert not llm.engine_core.has_unfinished_requests()
    llm.engine_core.check_no_leaks()
    with pytest.raises(InvalidRequestError, match="invalid regex constraint: .*unclosed group"):
        llm.generate("x", SamplingParams(constraint=Constraint.regex("(ab")))
    core = llm.engine_core
    with pytest.raises(InvalidRequestError, match="does not follow its choice constraint"):
        core.add_request("replay", [1, 2], SamplingParams(constraint=Constraint.choice(["ab"])),
                         output_token_ids=llm.tokenizer.encode("b"))
    assert not core.scheduler.requests
    core.check_no_leaks()
    assert llm.generate("still serving", good)[0].outputs[0].finish_reason == "length"


def test_unconstrained_requests_load_no_tokenizer_and_fill_no_mask(tiny_checkpoints: dict) -> None:
    args = EngineArgs(model=str(tiny_checkpoints["llama"]), **ARGS)
    core = EngineCore(args, load_model_runner(args))
    llm = LLM.from_engine_core(core)  # no tokenizer offered: the core loads its own when needed
    llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4))
    assert not core.structured.tokenizer_loaded
    assert core.runner.masks._executor is None and core.runner.masks._worker is None
    out = llm.generate({"prompt_token_ids": [5, 6, 7]},
                       SamplingParams(temperature=0.0, constraint=Constraint.choice(["ok"])))[0].outputs[0]
    assert core.structured.tokenizer_loaded and out.finish_reason == "stop"
    core.check_no_leaks()


def test_runner_without_constraint_support_refuses() -> None:
    core = make_core()
    with pytest.raises(InvalidRequestError, match="cannot serve constrained requests"):
        core.add_request("r", [1, 2], SamplingParams(constraint=Constraint.regex("a")))
    with pytest.raises(InvalidRequestError, match="cannot serve constrained requests"):
        core.prepare_constraint(Constraint.regex("a"))
    assert not core.has_unfinished_requests()
    core.check_no_leaks()
