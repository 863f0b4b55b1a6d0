"""Resolved jars are checked before use: a missing or broken jar says to run make setup."""

from __future__ import annotations

import pytest

from personalize import jars
from personalize.errors import MissingArtifact
from personalize.settings import Settings


def test_never_resolved_folder_says_to_run_make_setup(tmp_path):
    settings = Settings.from_env({"PERSONALIZE_LIB_DIR": str(tmp_path)})
    with pytest.raises(MissingArtifact) as info:
        jars.jars(settings, "flink")
    assert "was never resolved" in str(info.value) and "make setup" in str(info.value)


def test_a_broken_jar_is_reported(tmp_path):
    settings = Settings.from_env({"PERSONALIZE_LIB_DIR": str(tmp_path)})
    folder = tmp_path / "flink"
    folder.mkdir()
    (folder / ".resolved").write_text(jars._pom_hash())
    (folder / "flink-sql-connector-kafka-5.0.0-2.2.jar").write_bytes(b"not a zip")
    assert jars.problems(settings, "flink") == [f"{folder}/flink-sql-connector-kafka-5.0.0-2.2.jar is not a readable jar"]


def test_a_changed_pom_asks_for_a_new_resolution(tmp_path):
    settings = Settings.from_env({"PERSONALIZE_LIB_DIR": str(tmp_path)})
    folder = tmp_path / "flink"
    folder.mkdir()
    (folder / ".resolved").write_text("an older pom's hash")
    assert any("changed since" in p for p in jars.problems(settings, "flink"))
