"""Shared benchmark workloads, deterministic from a seed.

Every benchmark (splitserve, transformers, vLLM's CPU build) runs the *same*
requests, so the workloads live here as pure functions returning frozen
dataclasses that round-trip through JSON (peers run in other venvs and read
the JSON file, not this module).

* :func:`engine_workload` — offline engine throughput: random prompt token ids,
  greedy, ``ignore_eos``, a fixed number of output tokens.
* :func:`serving_workload` — online serving: chat turns that share a long
  system prompt plus occasional long-document prompts, arriving as a seeded
  Poisson process at a given rate.

Text prompts are made of words from :data:`WORDS`; the bench tokenizer
(``bench/bench_models.py``) has one token per word, so a prompt of ``n`` words
is ``n`` tokens there (other tokenizers will differ).
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENGINE_SCHEMA = "splitserve.bench.engine_workload/v1"
SERVING_SCHEMA = "splitserve.bench.serving_workload/v1"

# Token ids below this are left out of random prompts: the bench tokenizer
# keeps its special tokens (<unk>, <s>, </s>, <pad>) there.
FIRST_ORDINARY_TOKEN_ID = 16

WORDS: tuple[str, ...] = tuple(
    """
    the of and to in is was for on that with as by at from his her it an were
    are which this be or has had but not also first one their its new after
    who they two been other all there more would into time only may most some
    such many over year these can than when during then made them part world
    city three under used where while later both state well through between
    known called since before school people each team house river season game
    system water light music order power field story group paper model table
    number point place name line market value energy signal network server
    request token cache block layer router engine kernel memory queue batch
    prefix decode prefill stream worker node cluster latency window budget
    north south east west early late small large short long high low old young
    red blue green black white open close start stop read write send receive
    build test check move hold turn keep give take find show play work run
    """.split()
)


@dataclass(frozen=True)
class EngineRequest:
    """One offline request: prompt token ids and how many tokens to generate."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class EngineWorkload:
    """An offline throughput workload (greedy, ``ignore_eos``)."""

    name: str
    seed: int
    vocab_size: int
    max_tokens: int
    temperature: float
    ignore_eos: bool
    requests: tuple[EngineRequest, ...]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    @property
    def max_seq_len(self) -> int:
        return max(len(r.prompt_token_ids) + r.max_tokens for r in self.requests)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema"] = ENGINE_SCHEMA
        for req in data["requests"]:
            req["prompt_token_ids"] = list(req["prompt_token_ids"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineWorkload:
        if data.get("schema") != ENGINE_SCHEMA:
            raise ValueError(
                f"not an engine workload (schema {data.get('schema')!r}, expected {ENGINE_SCHEMA!r}); "
                "write it with bench/workload.py"
            )
        requests = tuple(
            EngineRequest(r["request_id"], tuple(int(t) for t in r["prompt_token_ids"]), int(r["max_tokens"]))
            for r in data["requests"]
        )
        return cls(
            name=str(data["name"]),
            seed=int(data["seed"]),
            vocab_size=int(data["vocab_size"]),
            max_tokens=int(data["max_tokens"]),
            temperature=float(data["temperature"]),
            ignore_eos=bool(data["ignore_eos"]),
            requests=requests,
        )


def engine_workload(
    vocab_size: int = 32000,
    *,
    quick: bool = False,
    seed: int = 0,
    num_requests: int | None = None,
    min_prompt_len: int | None = None,
    max_prompt_len: int | None = None,
    max_tokens: int | None = None,
) -> EngineWorkload:
    """The engine-throughput workload.

    Full: 64 requests, prompt lengths uniform in [32, 512], 128 output tokens.
    Quick: 16 requests, prompt lengths in [32, 256], 64 output tokens.
    Prompt token ids are uniform in ``[FIRST_ORDINARY_TOKEN_ID, vocab_size)``.
    Explicit arguments override the preset.
    """
    n = num_requests if num_requests is not None else (16 if quick else 64)
    lo = min_prompt_len if min_prompt_len is not None else 32
    hi = max_prompt_len if max_prompt_len is not None else (256 if quick else 512)
    out = max_tokens if max_tokens is not None else (64 if quick else 128)
    if vocab_size <= FIRST_ORDINARY_TOKEN_ID:
        raise ValueError(f"vocab_size={vocab_size} is too small; need more than {FIRST_ORDINARY_TOKEN_ID}")
    if not 1 <= lo <= hi:
        raise ValueError(f"prompt lengths must satisfy 1 <= min ({lo}) <= max ({hi})")
    if n < 1 or out < 1:
        raise ValueError(f"num_requests ({n}) and max_tokens ({out}) must be >= 1")
    rng = random.Random(f"engine:{seed}")
    requests = []
    for i in range(n):
        length = rng.randint(lo, hi)
        ids = tuple(rng.randrange(FIRST_ORDINARY_TOKEN_ID, vocab_size) for _ in range(length))
        requests.append(EngineRequest(request_id=f"req-{i:04d}", prompt_token_ids=ids, max_tokens=out))
    return EngineWorkload(
        name="engine-quick" if quick else "engine",
        seed=seed,
        vocab_size=vocab_size,
        max_tokens=out,
        temperature=0.0,
        ignore_eos=True,
        requests=tuple(requests),
    )


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ServingRequest:
    """One online request: when it arrives and what it sends (OpenAI chat messages)."""

    request_id: str
    arrival_s: float
    kind: str  # "chat" or "document"
    conversation: int  # chat conversation index; -1 for documents
    turn: int
    messages: tuple[ChatMessage, ...]
    max_tokens: int
    prompt_words: int

    @property
    def prompt_text(self) -> str:
        """The messages joined by newlines, for the completions endpoint."""
        return "\n".join(m.content for m in self.messages)


@dataclass(frozen=True)
class ServingWorkload:
    """An online workload: requests sorted by arrival time."""

    name: str
    seed: int
    rate_rps: float
    system_prompt_words: int
    requests: tuple[ServingRequest, ...]

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema"] = SERVING_SCHEMA
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingWorkload:
        if data.get("schema") != SERVING_SCHEMA:
            raise ValueError(
                f"not a serving workload (schema {data.get('schema')!r}, expected {SERVING_SCHEMA!r})"
            )
        requests = tuple(
            ServingRequest(
                request_id=r["request_id"],
                arrival_s=float(r["arrival_s"]),
                kind=r["kind"],
                conversation=int(r["conversation"]),
                turn=int(r["turn"]),
                messages=tuple(ChatMessage(m["role"], m["content"]) for m in r["messages"]),
                max_tokens=int(r["max_tokens"]),
                prompt_words=int(r["prompt_words"]),
            )
            for r in data["requests"]
        )
        return cls(
            name=data["name"],
            seed=int(data["seed"]),
            rate_rps=float(data["rate_rps"]),
            system_prompt_words=int(data["system_prompt_words"]),
            requests=requests,
        )


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def serving_workload(
    rate_rps: float,
    num_requests: int = 64,
    *,
    seed: int = 0,
    system_prompt_words: int = 512,
    document_fraction: float = 0.1,
    document_words: tuple[int, int] = (1024, 1536),
    user_words: tuple[int, int] = (16, 64),
    assistant_words: tuple[int, int] = (16, 64),
    num_conversations: int = 8,
    max_tokens: int = 64,
) -> ServingWorkload:
    """The serving workload.

    Requests arrive as a Poisson process at ``rate_rps`` (exponential gaps,
    seeded; the first at t=0). Each is, with probability
    ``document_fraction``, a long-document prompt (a fresh document plus a
    question, no shared prefix); otherwise the next turn of one of
    ``num_conversations`` chats, all of which start with the same system
    prompt of ``system_prompt_words`` words and carry their earlier turns
    (assistant turns are synthetic text), so prefixes are shared both across
    and within conversations.
    """
    if rate_rps <= 0:
        raise ValueError(f"rate_rps must be > 0, got {rate_rps}")
    if num_requests < 1 or num_conversations < 1:
        raise ValueError("num_requests and num_conversations must be >= 1")
    if not 0.0 <= document_fraction <= 1.0:
        raise ValueError(f"document_fraction must be in [0, 1], got {document_fraction}")
    rng = random.Random(f"serving:{seed}")
    system = ChatMessage("system", _words(rng, system_prompt_words))
    histories: list[list[ChatMessage]] = [[system] for _ in range(num_conversations)]
    turns = [0] * num_conversations
    requests: list[ServingRequest] = []
    t = 0.0
    for i in range(num_requests):
        if i > 0:
            t += rng.expovariate(rate_rps)
        if rng.random() < document_fraction:
            doc = _words(rng, rng.randint(*document_words))
            question = _words(rng, rng.randint(*user_words))
            messages: tuple[ChatMessage, ...] = (ChatMessage("user", f"{doc}\n{question}"),)
            kind, conv, turn = "document", -1, 0
        else:
            conv = rng.randrange(num_conversations)
            history = histories[conv]
            history.append(ChatMessage("user", _words(rng, rng.randint(*user_words))))
            messages = tuple(history)
            history.append(ChatMessage("assistant", _words(rng, rng.randint(*assistant_words))))
            kind, turn = "chat", turns[conv]
            turns[conv] += 1
        requests.append(
            ServingRequest(
                request_id=f"srv-{i:04d}",
                arrival_s=round(t, 6),
                kind=kind,
                conversation=conv,
                turn=turn,
                messages=messages,
                max_tokens=max_tokens,
                prompt_words=sum(len(m.content.split()) for m in messages),
            )
        )
    return ServingWorkload(
        name=f"serving-{rate_rps:g}rps",
        seed=seed,
        rate_rps=rate_rps,
        system_prompt_words=system_prompt_words,
        requests=tuple(requests),
    )


def write_json(data: dict[str, Any], path: Path) -> Path:
    """Write a workload/result dict as JSON (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a benchmark workload as JSON.")
    parser.add_argument("kind", choices=["engine", "serving"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="engine: the small variant")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--rate", type=float, default=1.0, help="serving: requests per second")
    parser.add_argument("--num-requests", type=int, default=None)
    args = parser.parse_args(argv)
    if args.kind == "engine":
        data = engine_workload(
            args.vocab_size, quick=args.quick, seed=args.seed, num_requests=args.num_requests
        ).to_dict()
    else:
        data = serving_workload(args.rate, args.num_requests or 64, seed=args.seed).to_dict()
    write_json(data, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
