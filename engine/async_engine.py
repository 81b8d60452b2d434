"""An EngineCore driven by one background thread, for asyncio services.

The step loop runs in a dedicated thread (torch releases the GIL while it
computes). Requests, aborts and KV notices reach that thread through a
command queue drained at the top of every iteration; outputs go back to each
request's asyncio queue with ``loop.call_soon_threadsafe``. When nothing can be
scheduled the thread sleeps on a condition until a command arrives.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from splitserve.engine.engine_args import EngineArgs
from splitserve.engine.engine_core import EngineCore
from splitserve.engine.outputs import EngineOutput, EngineStats
from splitserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

StepHook = Callable[[EngineCore], None]
"""Called on the engine thread right after each step, with the core."""


class EngineDeadError(RuntimeError):
    """The engine was shut down; no more requests are accepted."""


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[EngineOutput | BaseException]

    def put(self, item: EngineOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody listens
            pass


def _deliver(items: list[tuple[asyncio.Queue, EngineOutput]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], error: BaseException | None) -> None:
    def settle() -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass


class AsyncEngine:
    """Thread-safe front of one ``EngineCore``; the gRPC services wrap it.

    ``submit`` and the iterators it returns belong to an asyncio loop;
    ``abort``, ``finish_remote_kv``, ``release_held_blocks``, ``stats`` and
    ``shutdown`` may be called from any thread.

    ``after_step`` hooks run on the engine thread after every step that ran
    (successful or not), before the next command is applied: the one place
    where code outside the engine may read single-threaded state such as the
    block pool's events. A hook must not block; one that raises is logged
    and the engine goes on.
    """

    core: EngineCore

    def __init__(self, core: EngineCore | Callable[[], EngineCore], after_step: Sequence[StepHook] = ()) -> None:
        """``core``: the core, or a function that builds it, called on the
        engine thread (returns once it is built; its exception is raised here).

        Build a core that runs a model on the engine thread (as
        ``from_engine_args`` does): OpenMP keeps one thread pool per thread
        that runs parallel work, and once a process holds more pool threads
        than CPUs (a pool left by loading the model on another thread),
        libgomp stops spinning between parallel regions and every region
        pays a futex wake-up. On 2 cores that made a 256-token prefill step
        ~105 ms instead of ~80.
        """
        self._after_step = tuple(after_step)
        self._commands: deque[Callable[[], None]] = deque()
        self._wake = threading.Condition()
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._stopping = False
        built = threading.Event()
        failure: list[BaseException] = []

        def build_then_run() -> None:
            try:
                self.core = core if isinstance(core, EngineCore) else core()
                self._stats = self.core.stats()
            except BaseException as exc:  # noqa: BLE001 - re-raised on the constructing thread
                failure.append(exc)
                return
            finally:
                built.set()
            self._run()

        self._thread = threading.Thread(target=build_then_run, name="splitserve-engine", daemon=True)
        self._thread.start()
        built.wait()
        if failure:
            self._thread.join()
            raise failure[0]

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, after_step: Sequence[StepHook] = ()) -> AsyncEngine:
        """Load the model on the engine thread and start it."""
        from splitserve.engine.model_runner import load_model_runner

        return cls(lambda: EngineCore(engine_args, load_model_runner(engine_args)), after_step)

    # -- any thread -------------------------------------------------------

    async def submit(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        *,
        output_token_ids: Sequence[int] = (),
        cache_salt: str | None = None,
        prefill_only: bool = False,
        num_remote_tokens: int = 0,
    ) -> AsyncIterator[EngineOutput]:
        """Queue a request and return its stream of ``EngineOutput`` deltas.

        Returns once the engine thread accepted the request; its
        ``InvalidRequestError`` (or ``EngineDeadError``) is raised here. The
        stream ends after the output with ``finished`` set (finish_reason
        "abort" after ``abort``). Closing the stream early, or cancelling the
        task iterating it, aborts the request.
        """
        loop = asyncio.get_running_loop()
        if sampling_params is not None and sampling_params.constraint is not None:
            # Tokenizer load and grammar compile off the engine thread, so the
            # step loop keeps running; a bad constraint raises here.
            await loop.run_in_executor(None, self.core.prepare_constraint, sampling_params.constraint)
        sink = _Sink(loop, asyncio.Queue())
        accepted: asyncio.Future[None] = loop.create_future()
        args = (list(prompt_token_ids), sampling_params)
        kwargs = dict(output_token_ids=list(output_token_ids), cache_salt=cache_salt,
                      prefill_only=prefill_only, num_remote_tokens=num_remote_tokens)

        def add() -> None:
            try:
                self.core.add_request(request_id, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - handed to the submitter
                _resolve(loop, accepted, exc)
                return
            self._sinks[request_id] = sink
            _resolve(loop, accepted, None)

        self._send(add)
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return self._stream(request_id, sink)

    def abort(self, request_id: str) -> None:
        """Abort a request in any state; its stream ends with "abort"."""
        def command() -> None:
            found = self.core.abort_request(request_id)
            sink = self._sinks.pop(request_id, None)
            if found and sink is not None:
                sink.put(EngineOutput(request_id=request_id, finished=True, finish_reason="abort"))

        self._send(command, required=False)

    def finish_remote_kv(self, request_id: str, ok: bool) -> None:
        """Report a KV pull's end (see ``Scheduler.finish_remote_kv``)."""
        self._send(lambda: self.core.finish_remote_kv(request_id, ok), required=False)

    def release_held_blocks(self, request_id: str) -> None:
        """Unpin a handed-off prefill-only request's blocks."""
        self._send(lambda: self.core.release_held_blocks(request_id), required=False)

    def stats(self) -> EngineStats:
        """The snapshot taken after the engine thread's latest iteration."""
        return self._stats

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the engine thread; open streams end with "abort"."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # -- internals --------------------------------------------------------

    def _send(self, command: Callable[[], None], required: bool = True) -> None:
        with self._wake:
            if self._stopping:
                if required:
                    raise EngineDeadError("the engine is shut down")
                return
            self._commands.append(command)
            self._wake.notify()

    async def _stream(self, request_id: str, sink: _Sink) -> AsyncIterator[EngineOutput]:
        finished = False
        try:
            while True:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._commands and not self._stopping and (
                    self.core.last_step_idle or not self.core.scheduler.has_schedulable_requests()
                ):
                    self._wake.wait()
                commands, self._commands = self._commands, deque()
                stopping = self._stopping
            self._apply(commands)
            if stopping:
                break
            self.core.last_step_idle = False  # commands may have made work schedulable
            if self.core.scheduler.has_schedulable_requests():
                self._step()
                self._run_hooks()
            self._stats = self.core.stats()
        self._close_all()

    def _apply(self, commands: deque[Callable[[], None]]) -> None:
        for command in commands:
            try:
                command()
            except Exception:  # noqa: BLE001 - one bad notice must not stop the engine
                continue

    def _step(self) -> None:
        try:
            outputs = self.core.step()
        except Exception as exc:  # noqa: BLE001 - a runner failure fails its requests, not the engine
            for request_id, sink in list(self._sinks.items()):
                self.core.abort_request(request_id)
                sink.put(exc)
            self._sinks.clear()
            return
        # Before dispatch, so a consumer that saw an output sees stats counting it.
        self._stats = self.core.stats()
        # One wake-up per event loop per step, not one per request.
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, EngineOutput]]] = {}
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:
                continue
            batches.setdefault(sink.loop, []).append((sink.queue, output))
            if output.finished:
                del self._sinks[output.request_id]
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumers' loop is closed: nobody listens
                pass

    def _run_hooks(self) -> None:
        for hook in self._after_step:
            try:
                hook(self.core)
            except Exception:  # noqa: BLE001 - an observer must not stop the engine
                logger.exception("after-step hook %r failed", hook)

    def _close_all(self) -> None:
        # Commands were applied before leaving the loop, so every accepted
        # request has a sink and ends here with "abort".
        for request_id, sink in list(self._sinks.items()):
            self.core.abort_request(request_id)
            sink.put(EngineOutput(request_id=request_id, finished=True, finish_reason="abort"))
        self._sinks.clear()
        self._stats = self.core.stats()
