"""Batched token sampling with position-keyed randomness.

Order of operations (vLLM V1's): constrained rows' token bitmasks set the
tokens their constraint refuses to -inf; raw logprobs from those logits;
min_tokens masks eos/stop ids (never a constrained row's last allowed
tokens); repetition (prompt + output tokens), frequency and presence (output
tokens) penalties; greedy rows take the argmax; the others
divide by temperature, apply min-p, then top-k and top-p, and draw by
Gumbel-max with noise from ``random_keys`` keyed on (seed, output index).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from splitserve.engine.random_keys import gumbel_noise
from splitserve.engine.request import Request, TokenLogprobs
from splitserve.engine.structured.bitmask import TokenBitmask, apply_token_bitmask


@dataclass(frozen=True)
class Penalties:
    """Per-row penalty factors and the token statistics they apply to."""

    repetition: torch.Tensor  # [B] float32
    presence: torch.Tensor  # [B] float32
    frequency: torch.Tensor  # [B] float32
    seen: torch.Tensor  # [B, V] bool: in the prompt or the output
    output_counts: torch.Tensor  # [B, V] float32


@dataclass(frozen=True)
class SamplingMetadata:
    """One step's sampling inputs, one row per sampling request, built once."""

    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    temperature: torch.Tensor  # [B] float32 (1 for greedy rows, unused)
    top_k: torch.Tensor | None  # [B] int64, vocab size where disabled; None: nobody uses it
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    seeds: torch.Tensor  # [B] int64
    output_index: torch.Tensor  # [B] int64: index of the token being sampled
    penalties: Penalties | None
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) masked by min_tokens
    num_logprobs: tuple[int | None, ...]
    token_bitmask: TokenBitmask | None = None  # constrained rows' allowed tokens


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def build_sampling_metadata(requests: Sequence[Request], vocab_size: int, device: torch.device,
                            token_bitmask: TokenBitmask | None = None) -> SamplingMetadata:
    """Gather the sampling rows' parameters into tensors on ``device``;
    ``token_bitmask`` holds the masks of the constrained rows, if any."""
    params = [r.sampling_params for r in requests]
    greedy = [p.is_greedy for p in params]
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    sampled = [not g for g in greedy]

    def floats(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    def used(values: list, default: object) -> bool:
        return any(s and v != default for s, v in zip(sampled, values))

    banned_rows: list[int] = []
    banned_ids: list[int] = []
    for row, (r, p) in enumerate(zip(requests, params)):
        if r.num_output_tokens < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))
            stops = {t for t in stops if t < vocab_size}
            banned_rows.extend([row] * len(stops))
            banned_ids.extend(sorted(stops))
    banned = None
    if banned_rows:
        banned = (torch.tensor(banned_rows, device=device), torch.tensor(banned_ids, device=device))
    return SamplingMetadata(
        greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
        all_greedy=all(greedy),
        temperature=floats([1.0 if g else p.temperature for g, p in zip(greedy, params)]),
        top_k=torch.tensor(top_k, dtype=torch.int64, device=device) if used(top_k, vocab_size) else None,
        top_p=floats(top_p) if used(top_p, 1.0) else None,
        min_p=floats(min_p) if used(min_p, 0.0) else None,
        seeds=torch.tensor([r.seed for r in requests], dtype=torch.int64, device=device),
        output_index=torch.tensor([r.num_output_tokens for r in requests], dtype=torch.int64, device=device),
        penalties=_penalties(requests, vocab_size, device) if any(p.has_penalties for p in params) else None,
        banned=banned,
        num_logprobs=tuple(p.logprobs for p in params),
        token_bitmask=token_bitmask,
    )


def _penalties(requests: Sequence[Request], vocab_size: int, device: torch.device) -> Penalties:
    rows = len(requests)

    def padded(lists: list[list[int]]) -> torch.Tensor:
        width = max((len(x) for x in lists), default=0)
        # Column ``vocab_size`` swallows the padding and is cut off afterwards.
        return torch.tensor([x + [vocab_size] * (width - len(x)) for x in lists],
                            dtype=torch.int64, device=device).view(rows, width)

    prompts = padded([r.prompt_token_ids for r in requests])
    outputs = padded([r.output_token_ids for r in requests])
    counts = torch.zeros(rows, vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=torch.float32))
    seen = torch.zeros(rows, vocab_size + 1, dtype=torch.bool, device=device)
    seen.scatter_(1, prompts, True)
    output_counts = counts[:, :vocab_size]
    params = [r.sampling_params for r in requests]
    return Penalties(
        repetition=torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device),
        presence=torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=device),
        frequency=torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=device),
        seen=seen[:, :vocab_size] | (output_counts > 0),
        output_counts=output_counts,
    )


class Sampler:
    """Picks one token per row of ``logits`` [B, V] (any float dtype).

    ``argmax``: a faster ``x.argmax(dim=-1)`` for fp32 CPU rows (the CPU
    backend's ``CPULayerOps.argmax``, same indices), used for the greedy pick.
    """

    def __init__(self, argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self._argmax = argmax

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        if metadata.token_bitmask is not None:
            logits = apply_token_bitmask(logits, metadata.token_bitmask)
        raw_logprobs = None
        if any(n is not None for n in metadata.num_logprobs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if metadata.banned is not None:
            banned = logits.index_put(metadata.banned, torch.tensor(float("-inf"), device=logits.device))
            if metadata.token_bitmask is not None:
                # A constraint that allows only eos/stop tokens wins over min_tokens.
                dead = torch.isneginf(banned).all(dim=-1, keepdim=True)
                banned = torch.where(dead, logits, banned)
            logits = banned
        if metadata.penalties is not None:
            logits = apply_penalties(logits, metadata.penalties)
        if self._argmax is not None and logits.device.type == "cpu" and logits.stride(-1) == 1:
            tokens = self._argmax(logits)
        else:
            tokens = logits.argmax(dim=-1)
        if not metadata.all_greedy:
            sampled = self._sample(logits, metadata)
            tokens = torch.where(metadata.greedy, tokens, sampled)
        token_list = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(token_list)
        if raw_logprobs is not None:
            logprobs = token_logprobs(raw_logprobs, tokens, metadata.num_logprobs)
        return SamplerOutput(token_list, logprobs)

    @staticmethod
    def _sample(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        logits = logits / metadata.temperature[:, None]
        if metadata.min_p is not None:
            probs = torch.softmax(logits, dim=-1)
            threshold = probs.max(dim=-1, keepdim=True).values * metadata.min_p[:, None]
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        if metadata.top_k is not None or metadata.top_p is not None:
            logits = apply_top_k_top_p(logits, metadata.top_k, metadata.top_p)
        noise = gumbel_noise(metadata.seeds, metadata.output_index, logits.shape[-1])
        return (logits + noise).argmax(dim=-1)


def apply_penalties(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """vLLM semantics: repetition divides positive / multiplies negative logits
    of seen tokens; frequency and presence subtract per output occurrence."""
    rep = penalties.repetition[:, None].expand_as(logits)
    scaled = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(penalties.seen, scaled, logits)
    logits = logits - penalties.frequency[:, None] * penalties.output_counts
    return logits - penalties.presence[:, None] * (penalties.output_counts > 0).float()


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask logits outside each row's top-k, then outside its top-p nucleus
    (renormalised after top-k); ties at the k-th value are kept."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k).clamp(min=0)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p[:, None])
        drop[:, -1] = False  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def token_logprobs(raw: torch.Tensor, tokens: torch.Tensor,
                   num_logprobs: Sequence[int | None]) -> list[TokenLogprobs | None]:
    """Row ``i``'s logprob of ``tokens[i]`` under ``raw`` [N, V] (logprobs),
    its rank and the top ``num_logprobs[i]`` alternatives (None: no entry)."""
    chosen = raw.gather(1, tokens[:, None])
    ranks = (raw > chosen).sum(dim=-1) + 1
    k = max(n or 0 for n in num_logprobs)
    top_values, top_ids = raw.topk(k, dim=-1) if k else (raw[:, :0], tokens[:, None][:, :0])
    chosen_l, ranks_l = chosen[:, 0].tolist(), ranks.tolist()
    top_values_l, top_ids_l, token_l = top_values.tolist(), top_ids.tolist(), tokens.tolist()
    out: list[TokenLogprobs | None] = []
    for row, n in enumerate(num_logprobs):
        if n is None:
            out.append(None)
            continue
        out.append(TokenLogprobs(token_id=token_l[row], logprob=chosen_l[row], rank=ranks_l[row],
                                 top_token_ids=tuple(top_ids_l[row][:n]),
                                 top_logprobs=tuple(top_values_l[row][:n])))
    return out
