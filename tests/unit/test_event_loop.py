"""splitserve.event_loop: uvloop unless switched off; a bad setting is refused."""
from __future__ import annotations

import asyncio

import pytest

from splitserve import event_loop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_by_default_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.delenv(event_loop.ENV, raising=False)
    assert event_loop.loop_kind() == "uvloop"
    assert event_loop.run(_loop_module()).startswith("uvloop")


def test_asyncio_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "asyncio")
    assert event_loop.run(_loop_module()).startswith("asyncio")


def test_a_bad_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "tokio")
    with pytest.raises(ValueError, match="SPLITSERVE_EVENT_LOOP must be one of"):
        event_loop.loop_kind()


def test_grpc_aio_runs_on_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's pod calls (grpc.aio) work on uvloop."""
    pytest.importorskip("uvloop")
    import grpc

    from splitserve.proto import splitserve_v1_pb2 as pb
    from splitserve.proto import splitserve_v1_pb2_grpc as pb_grpc

    class Engine(pb_grpc.EngineServicer):
        async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadReport:
            return pb.LoadReport(num_running=3)

    async def main() -> int:
        server = grpc.aio.server()
        pb_grpc.add_EngineServicer_to_server(Engine(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                report = await pb_grpc.EngineStub(channel).GetLoad(pb.GetLoadRequest(), timeout=10)
                return report.num_running
        finally:
            await server.stop(0)

    monkeypatch.delenv(event_loop.ENV, raising=False)
    assert event_loop.run(main()) == 3
