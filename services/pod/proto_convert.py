"""Conversions between the control plane's protobuf messages and the engine's
dataclasses. Servicers and gRPC clients call these and nothing else touches
protobuf field names."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.request import TokenLogprobs
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.structured.constraint import Constraint, ConstraintKind
from splitserve.proto import splitserve_v1_pb2 as pb

_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
_FINISH_REASON_NAMES = {value: name for name, value in _FINISH_REASONS.items()}


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    message = pb.SamplingParams(
        n=params.n,
        min_tokens=params.min_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
    )
    if params.max_tokens is not None:
        message.max_tokens = params.max_tokens
    if params.seed is not None:
        message.seed = params.seed
    if params.logprobs is not None:
        message.logprobs = params.logprobs
    if params.prompt_logprobs is not None:
        message.prompt_logprobs = params.prompt_logprobs
    if params.constraint is not None:
        message.constraint.CopyFrom(constraint_to_proto(params.constraint))
    return message


def sampling_from_proto(message: pb.SamplingParams) -> SamplingParams:
    """Raise ``InvalidRequestError`` (from SamplingParams) on bad values."""
    return SamplingParams(
        n=message.n or 1,
        max_tokens=message.max_tokens if message.HasField("max_tokens") else None,
        min_tokens=message.min_tokens,
        temperature=_f32(message.temperature),
        top_p=_f32(message.top_p),
        top_k=message.top_k,
        min_p=_f32(message.min_p),
        seed=message.seed if message.HasField("seed") else None,
        presence_penalty=_f32(message.presence_penalty),
        frequency_penalty=_f32(message.frequency_penalty),
        repetition_penalty=_f32(message.repetition_penalty),
        stop_token_ids=list(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
        logprobs=message.logprobs if message.HasField("logprobs") else None,
        prompt_logprobs=message.prompt_logprobs if message.HasField("prompt_logprobs") else None,
        constraint=constraint_from_proto(message.constraint) if message.HasField("constraint") else None,
    )


def constraint_to_proto(constraint: Constraint) -> pb.Constraint:
    message = pb.Constraint(disable_any_whitespace=constraint.disable_any_whitespace,
                            disable_additional_properties=constraint.disable_additional_properties)
    if constraint.whitespace_pattern is not None:
        message.whitespace_pattern = constraint.whitespace_pattern
    if constraint.kind is ConstraintKind.CHOICE:
        message.choice.choices.extend(constraint.spec)
    elif constraint.kind is ConstraintKind.JSON_OBJECT:
        message.json_object = True
    else:
        setattr(message, constraint.kind.value, constraint.spec)
    return message


def constraint_from_proto(message: pb.Constraint) -> Constraint:
    """Raise ``InvalidRequestError`` (from Constraint) on a malformed one."""
    kind = message.WhichOneof("kind")
    if kind is None:
        raise InvalidRequestError("a constraint needs one of json_schema, regex, choice, grammar, json_object")
    spec: str | tuple[str, ...] = ""
    if kind == "choice":
        spec = tuple(message.choice.choices)
    elif kind in ("json_schema", "regex", "grammar"):
        spec = getattr(message, kind)
    return Constraint(
        ConstraintKind(kind),
        spec,
        disable_any_whitespace=message.disable_any_whitespace,
        disable_additional_properties=message.disable_additional_properties,
        whitespace_pattern=message.whitespace_pattern if message.HasField("whitespace_pattern") else None,
    )


def _f32(value: float) -> float:
    # float32 on the wire: round to 7 significant digits so 0.9 stays 0.9.
    return float(f"{value:.7g}")


def logprobs_to_proto(logprobs: TokenLogprobs) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(
        token_id=logprobs.token_id,
        logprob=logprobs.logprob,
        rank=logprobs.rank,
        top_token_ids=logprobs.top_token_ids,
        top_logprobs=logprobs.top_logprobs,
    )


def logprobs_from_proto(message: pb.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(
        token_id=message.token_id,
        logprob=message.logprob,
        rank=message.rank,
        top_token_ids=tuple(message.top_token_ids),
        top_logprobs=tuple(message.top_logprobs),
    )


def logprobs_list_from_proto(messages: Iterable[pb.TokenLogprobs]) -> list[TokenLogprobs]:
    return [logprobs_from_proto(m) for m in messages]


def prompt_logprobs_to_proto(entries: Sequence[TokenLogprobs | None] | None) -> list[pb.TokenLogprobs]:
    """Prompt logprobs on the wire: the leading ``None`` (token 0) is implied."""
    return [logprobs_to_proto(e) for e in entries or () if e is not None]


def prompt_logprobs_from_proto(messages: Iterable[pb.TokenLogprobs]) -> tuple[TokenLogprobs | None, ...]:
    """The engine's shape back: ``None`` for token 0, then one entry per token."""
    return (None, *logprobs_list_from_proto(messages))


def decode_tokens(event: pb.DecodeResponse) -> pb.TokenChunk | None:
    """The tokens a Decode event carries: its chunk, or a Finished event's
    ``last_chunk`` (see ``DecodeRequest.accept_last_chunk``); None otherwise."""
    kind = event.WhichOneof("event")
    if kind == "chunk":
        return event.chunk
    if kind == "finished" and event.finished.HasField("last_chunk"):
        return event.finished.last_chunk
    return None


def finish_reason_to_proto(reason: str | None) -> int:
    if reason is None:
        return pb.FINISH_REASON_UNSPECIFIED
    return _FINISH_REASONS[reason]


def finish_reason_from_proto(value: int) -> str | None:
    return _FINISH_REASON_NAMES.get(value)
