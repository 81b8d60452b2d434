"""The control plane's stubs build from proto/ and keep the design's shape."""
from __future__ import annotations

from pathlib import Path

from splitserve.proto.stub_builder import build_stubs


def test_stubs_build_into_a_fresh_folder(tmp_path: Path) -> None:
    source = Path(__file__).resolve().parents[2] / "proto" / "splitserve_v1.proto"
    (tmp_path / source.name).write_text(source.read_text())
    names = sorted(p.name for p in build_stubs(tmp_path))
    assert names == ["splitserve_v1_pb2.py", "splitserve_v1_pb2.pyi", "splitserve_v1_pb2_grpc.py"]
    grpc_stub = (tmp_path / "splitserve_v1_pb2_grpc.py").read_text()
    assert "from splitserve.proto import splitserve_v1_pb2" in grpc_stub


def test_decode_stream_events_are_a_oneof_and_enums_start_unspecified() -> None:
    from splitserve.proto import splitserve_v1_pb2 as pb

    event = pb.DecodeResponse(finished=pb.Finished(reason=pb.FINISH_REASON_LENGTH))
    assert event.WhichOneof("event") == "finished"
    event.chunk.token_ids.append(7)
    assert event.WhichOneof("event") == "chunk"
    for enum in (pb.Role, pb.FinishReason, pb.KVSource):
        assert enum.Name(0).endswith("_UNSPECIFIED")
    rpcs = {m.name for m in pb.DESCRIPTOR.services_by_name["Engine"].methods}
    assert {"Prefill", "Decode", "Abort", "GetTransferMetadata", "GetLoad"} <= rpcs
