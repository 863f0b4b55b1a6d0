"""The live function's SQL side (operators/live.py) matches the Java function it calls."""

from __future__ import annotations

import re

from operators import live
from personalize.settings import Settings, project_root

JAVA = project_root() / "operators" / "jvm" / "src" / "main" / "java" / "personalize" / "profile" / "LiveStateFunction.java"


def java_output_columns() -> list[tuple[str, str]]:
    """The ROW<...> of LiveStateFunction.OUTPUT, as (name, type) pairs."""
    text = JAVA.read_text()
    start = text.index("public static final String OUTPUT =")
    hint = "".join(re.findall(r'"([^"]*)"', text[start:text.index(";", start)]))
    body = hint[hint.index("ROW<") + 4:hint.rindex(">")]
    return [tuple(column.split()) for column in body.split(",")]


def test_the_live_columns_are_the_java_function_s_output_between_its_kind_and_its_packed_session():
    columns = java_output_columns()
    assert columns[0] == ("kind", "STRING") and columns[-1] == ("session", "STRING")
    assert columns[1:-1] == list(live.LIVE_COLUMNS)


def test_the_live_rows_select_every_live_column_and_skip_superseded_state():
    sql = live.live_rows("changes")
    assert all(name in sql for name, _ in live.LIVE_COLUMNS)
    assert "erased_since(user_id, epoch)" in sql and f"kind = '{live.LIVE}'" in sql
    assert "erased_since" not in live.live_rows("changes", erasure_filter=False)
    assert live.closed_sessions("changes", erasure_filter=False) == \
        f"SELECT session FROM changes WHERE kind = '{live.CLOSED}'"


def test_the_function_is_built_with_the_session_and_window_settings():
    s = Settings.from_env({"PERSONALIZE_SESSION_GAP_MS": "60000", "PERSONALIZE_RECENT_WINDOW_MS": "600000",
                           "PERSONALIZE_RECENT_SLIDE_MS": "120000", "PERSONALIZE_SESSION_LIST_LIMIT": "7"})
    assert live.function_args(s)[:7] == ("60000", "600000", "120000", "7", str(s.state_ttl_ms), "false",
                                         s.topic_model_snapshots)
    assert live.function_args(s, bounded=True)[5] == "true"
    assert live.function_args(s)[7]["bootstrap.servers"] == s.bootstrap_servers
