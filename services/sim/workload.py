"""A multi-tenant chat workload for fleet benches, deterministic from a seed.

Tenants have system prompts of ``system_tokens`` tokens and a Zipf
popularity (tenant ``k`` of ``n`` is picked with weight ``1 / (k+1)^s``).
Sessions arrive as a Poisson process (``sessions_per_s``) for
``duration_s``; each belongs to one tenant and has ``turns`` turns. Turn
``t``'s prompt is the system prompt, then every earlier turn's user message
and assistant reply, then its own user message: what a chat client resends.
The assistant replies are synthetic token ids (a simulated model's output is
not text), so a turn's prefix is its session's previous prompt plus a
reply the prefill pods have never computed. A client sends a turn
``think_s`` (exponential) after the previous one finished.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkloadSpec:
    num_tenants: int = 300
    system_tokens: tuple[int, int] = (1024, 4096)
    zipf_s: float = 1.1
    sessions_per_s: float = 8.0
    duration_s: float = 60.0
    turns: tuple[int, int] = (1, 6)
    user_tokens: tuple[int, int] = (32, 256)
    reply_tokens: tuple[int, int] = (32, 128)
    max_tokens: tuple[int, int] = (4, 8)
    think_s: float = 1.0
    token_ids: tuple[int, int] = (16, 256)  # ids drawn from [lo, hi): plain bytes of the tiny tokenizer
    seed: int = 0

    def __post_init__(self) -> None:
        pairs = ("system_tokens", "turns", "user_tokens", "reply_tokens", "max_tokens", "token_ids")
        for name in pairs:
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"WorkloadSpec.{name} must be (lo, hi) with 0 < lo <= hi, got {(lo, hi)}")
        if self.num_tenants < 1 or self.sessions_per_s <= 0 or self.duration_s <= 0 or self.zipf_s < 0:
            raise ValueError("num_tenants >= 1, sessions_per_s > 0, duration_s > 0 and zipf_s >= 0 are required")

    @property
    def mean_turns(self) -> float:
        return (self.turns[0] + self.turns[1]) / 2


@dataclass(frozen=True)
class Turn:
    session_id: int
    tenant: int
    turn: int
    prompt: tuple[int, ...]
    max_tokens: int
    think_s: float  # wait after the previous turn finished (0 for the first)


@dataclass(frozen=True)
class Session:
    session_id: int
    tenant: int
    start_s: float
    turns: tuple[Turn, ...]


def _ids(rng: random.Random, n: int, spec: WorkloadSpec) -> tuple[int, ...]:
    lo, hi = spec.token_ids
    return tuple(rng.randrange(lo, hi) for _ in range(n))


def system_prompts(spec: WorkloadSpec) -> list[tuple[int, ...]]:
    rng = random.Random(f"fleet-system:{spec.seed}")
    return [_ids(rng, rng.randint(*spec.system_tokens), spec) for _ in range(spec.num_tenants)]


def build_sessions(spec: WorkloadSpec) -> list[Session]:
    systems = system_prompts(spec)
    weights = [1.0 / (k + 1) ** spec.zipf_s for k in range(spec.num_tenants)]
    rng = random.Random(f"fleet-sessions:{spec.seed}")
    sessions: list[Session] = []
    t = rng.expovariate(spec.sessions_per_s)
    while t < spec.duration_s:
        sid = len(sessions)
        tenant = rng.choices(range(spec.num_tenants), weights)[0]
        history: tuple[int, ...] = systems[tenant]
        turns = []
        for k in range(rng.randint(*spec.turns)):
            user = _ids(rng, rng.randint(*spec.user_tokens), spec)
            prompt = history + user
            turns.append(Turn(sid, tenant, k, prompt, rng.randint(*spec.max_tokens),
                              rng.expovariate(1.0 / spec.think_s) if k else 0.0))
            history = prompt + _ids(rng, rng.randint(*spec.reply_tokens), spec)
        sessions.append(Session(sid, tenant, t, tuple(turns)))
        t += rng.expovariate(spec.sessions_per_s)
    return sessions


def num_requests(sessions: list[Session]) -> int:
    return sum(len(s.turns) for s in sessions)
