"""Replay parses the three log formats, orders by event time, and reports unreadable rows by line."""

from __future__ import annotations

from pathlib import Path

import pytest

from personalize import replay
from personalize.errors import PersonalizeError

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def test_canonical_csv_with_iso_and_epoch_times_and_default_consent(tmp_path):
    f = tmp_path / "log.csv"
    f.write_text(
        "event_time,event_type,user_id,session_id,product_id,category,price,quantity\n"
        "2019-10-01T00:00:05Z,purchase,u1,,p1,c,9.99,2\n"
        "1569888000000,add_to_cart,u1,s1,p1,c,9.99,\n"
        "yesterday,page_view,u2,,,,,\n"
        "2019-10-01T00:00:09Z,teleport,u2,,,,,\n"
    )
    result = replay.parse(f)
    assert result.format == "canonical"
    assert [(e["event_type"], e["event_time"], e["quantity"]) for e in result.events] == [
        ("add_to_cart", 1569888000000, 1), ("purchase", 1569888005000, 2)]
    assert all(e["consent_personalization"] and e["consent_marketing"] for e in result.events)
    assert [line for line, _ in result.bad_rows] == [4, 5]
    assert "unknown event_type 'teleport'" in result.bad_rows[1][1]


def test_rees46_sample_reports_its_cut_last_row():
    result = replay.parse(SHARED / "rees46-2019-10-01.csv")
    assert result.format == "rees46"
    assert len(result.events) == 17434
    assert result.bad_rows == [(17436, "8 fields, expected 9")]
    types = {}
    for e in result.events:
        types[e["event_type"]] = types.get(e["event_type"], 0) + 1
    assert types == {"product_view": 17055, "add_to_cart": 165, "purchase": 214}


def test_taobao_json_lines_map_behaviors():
    result = replay.parse(SHARED / "taobao-user-behavior-1k.jsonl")
    assert result.format == "taobao" and len(result.events) == 1000 and not result.bad_rows
    assert {e["event_type"] for e in result.events} <= {"product_view", "add_to_cart", "purchase"}
    assert len({e["user_id"] for e in result.events}) == 945


def test_unknown_header_is_refused(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("a,b\n1,2\n")
    with pytest.raises(PersonalizeError, match="unknown CSV header"):
        replay.parse(f)
