"""Submitting a request to the pod's engine, with engine errors as ``PodError``."""
from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from splitserve.engine.async_engine import AsyncEngine, EngineDeadError
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.outputs import EngineOutput
from splitserve.engine.sampling_params import SamplingParams
from splitserve.pod.messages import invalid, unavailable


async def submit_to_engine(engine: AsyncEngine, request_id: str, token_ids: Sequence[int],
                           sampling: SamplingParams, **kwargs: object) -> AsyncIterator[EngineOutput]:
    """``engine.submit`` with a refused request as INVALID_ARGUMENT and a dead
    engine as UNAVAILABLE (the router retries elsewhere)."""
    try:
        return await engine.submit(request_id, token_ids, sampling, **kwargs)  # type: ignore[arg-type]
    except InvalidRequestError as exc:
        raise invalid(str(exc)) from None
    except EngineDeadError:
        raise unavailable("the engine is shut down; retry on another pod") from None
