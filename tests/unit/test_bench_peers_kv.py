"""kv_peer: parsing vLLM's Prometheus text and the handoff table."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers.kv_peer import NIXL_BYTES, NIXL_XFER, VllmHandoff, _delta, format_rows, parse_metric_sums  # noqa: E402

METRICS = """# HELP vllm:nixl_xfer_time_seconds Histogram of transfer duration for NIXL KV Cache transfers.
# TYPE vllm:nixl_xfer_time_seconds histogram
vllm:nixl_xfer_time_seconds_bucket{engine="0",le="0.001",model_name="m"} 1.0
vllm:nixl_xfer_time_seconds_sum{engine="0",model_name="m"} 0.004
vllm:nixl_xfer_time_seconds_count{engine="0",model_name="m"} 2.0
vllm:nixl_xfer_time_seconds_sum{engine="1",model_name="m"} 0.001
vllm:nixl_xfer_time_seconds_count{engine="1",model_name="m"} 1.0
vllm:nixl_bytes_transferred_sum{engine="0",model_name="m"} 1048576.0
vllm:num_requests_running{engine="0",model_name="m"} 0.0
"""


def test_parse_metric_sums_adds_label_sets_and_skips_others() -> None:
    sums = parse_metric_sums(METRICS, (NIXL_XFER, NIXL_BYTES))
    assert sums[NIXL_XFER + "_sum"] == 0.005 and sums[NIXL_XFER + "_count"] == 3.0
    assert sums[NIXL_BYTES + "_sum"] == 1048576.0
    assert "vllm:num_requests_running" not in sums and NIXL_XFER + "_bucket" not in sums


def test_delta_is_none_when_the_metric_is_absent() -> None:
    assert _delta({}, {}, NIXL_XFER + "_sum") is None
    assert _delta({"a": 3.0}, {"a": 1.0}, "a") == 2.0
    assert _delta({"a": 3.0}, {}, "a") == 3.0


def test_handoff_rate_and_table() -> None:
    v = VllmHandoff(64, 0.002, 1, 1_000_000.0, 0.05, 0.030, 0.020)
    assert v.mb_per_s == 500.0 and abs(v.handoff_overhead_s - 0.010) < 1e-12
    ours = [{"blocks": 4, "bytes": 4 * 262144, "p50_ms": 1.0}]
    table = format_rows([v, VllmHandoff(4080, None, 0, None, 1.0, 0.5, 0.1)], ours)
    lines = table.splitlines()
    assert "    64 |" in lines[2] and "500" in lines[2] and "1.00" in lines[2]
    assert "  4080 |" in lines[3] and " - " in lines[3]


def test_per_request_table_takes_medians_and_the_ratio() -> None:
    from bench.peers.kv_pods import PodHandoff, format_per_request

    vllm = [VllmHandoff(64, 0.0004, 1, 2 * 2**20, 0.1, wall, 0.08) for wall in (0.040, 0.050, 0.900)]
    ours = [PodHandoff(64, "pulled", 2**20, read, wall, 0.05) for read, wall in ((0.0006, 0.02), (0.0004, 0.01),
                                                                                (None, 0.03))]
    row = format_per_request(vllm, ours).splitlines()[2].split()
    # tokens | vLLM dec 50 ms (median, the 900 ms outlier ignored) | ours 20 ms | ratio 0.40 | READs
    assert row[:6] == ["64", "|", "50.0", "20.0", "0.40", "|"]
    assert row[6:8] == ["0.4", "0.5"]  # vLLM's 0.4 ms; ours the median of the two READs timed
    assert PodHandoff(64, "recomputed", 0, None, 0.1, 0.1).mb_per_s is None


def test_a_failed_scrape_gives_no_delta() -> None:
    sums = {NIXL_XFER + "_sum": 0.5}
    assert _delta(None, sums, NIXL_XFER + "_sum") is None
    assert _delta(sums, None, NIXL_XFER + "_sum") is None
    assert _delta(sums, {}, NIXL_XFER + "_sum") == 0.5
