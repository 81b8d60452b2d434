"""engine_peer: parsing splitserve's offline result, agreement rows, the table, the JSON shape."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers.engine_peer import (  # noqa: E402
    SPLITSERVE_SCHEMA,
    EnginePeerReport,
    OfflineRun,
    agreement_rows,
    format_table,
    from_vllm,
    parse_splitserve_result,
)
from bench.peers.vllm_runner import BatchTiming, VllmOfflineResult  # noqa: E402


def _batch(tok_s: float) -> dict:
    return {"elapsed_s": 2.0, "output_tokens": int(2 * tok_s), "output_tok_s": tok_s, "latencies_s": None}


def test_parse_splitserve_result() -> None:
    run = parse_splitserve_result({
        "schema": SPLITSERVE_SCHEMA, "dtype": "float32", "threads": 2, "startup_s": 1.5,
        "cold": _batch(100.0), "warm": _batch(150.0), "single_request_latency_s": 0.3,
        "peak_rss_bytes": 2**30, "output_token_ids": [[1, 2], [3]],
    })
    assert (run.system, run.cold_tok_s, run.warm_tok_s, run.output_token_ids) == (
        "splitserve", 100.0, 150.0, ((1, 2), (3,)))


def test_parse_splitserve_result_rejects_other_schema_and_missing_fields() -> None:
    with pytest.raises(ValueError, match="not a splitserve"):
        parse_splitserve_result({"schema": "x"})
    with pytest.raises(ValueError, match="lacks field"):
        parse_splitserve_result({"schema": SPLITSERVE_SCHEMA, "dtype": "float32"})


def test_from_vllm_keeps_cold_and_warm_apart() -> None:
    t = BatchTiming(1.0, 10, 10.0, None, None)
    w = BatchTiming(0.5, 10, 20.0, None, None)
    r = VllmOfflineResult("0.32.0", "m", "bfloat16", 1, "0", False, "engine-quick", 1, 5, 60.0, t, w, 0.1,
                          3 * 2**30, ((7,),))
    run = from_vllm(r)
    assert (run.system, run.cold_tok_s, run.warm_tok_s, run.startup_s) == ("vllm 0.32.0", 10.0, 20.0, 60.0)


def test_agreement_rows_compare_every_pair_on_the_first_requests() -> None:
    rows = agreement_rows("float32", {"transformers": [[1, 2], [3, 4], [9]], "splitserve": [[1, 2], [3, 5], [8]],
                                      "vllm x": ((1, 2), (3, 4), (7,))}, limit=2)
    assert [(r.reference, r.other, r.text) for r in rows] == [
        ("transformers", "splitserve", "1/2"), ("transformers", "vllm x", "2/2"), ("splitserve", "vllm x", "1/2")]
    assert rows[0].prefix_fraction == 0.75


def test_table_and_json_hold_both_systems_without_token_ids() -> None:
    runs = (OfflineRun("splitserve", "float32", 2, 1.0, 90.0, 120.0, 0.5, 2**30, ((1,),)),
            OfflineRun("vllm 0.32.0", "float32", 2, 70.0, 80.0, 200.0, 0.4, 3 * 2**30, ((1,),)))
    report = EnginePeerReport(runs, tuple(agreement_rows("float32", {"splitserve": [[1]], "vllm": [[1]]}, 1)))
    table = format_table(report)
    assert "splitserve" in table and "vllm 0.32.0" in table and "200.0" in table and "3.00" in table
    assert "splitserve vs vllm: 1/1 exact" in table
    data = report.to_dict()
    assert data["schema"] == "splitserve.bench.engine_peer/v1"
    assert all("output_token_ids" not in r for r in data["runs"]) and data["agreement"][0]["exact"] == 1
