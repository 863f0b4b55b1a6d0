"""Resolved jars are checked before use: a missing or broken jar says to run make setup."""

from __future__ import annotations

import re
import subprocess

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
    (folder / ".resolved").write_text(jars._pom_hash("flink"))
    (folder / "flink-sql-connector-kafka-5.0.0-2.2.jar").write_bytes(b"not a zip")
    assert jars.problems(settings, "flink") == [f"{folder}/flink-sql-connector-kafka-5.0.0-2.2.jar is not a readable jar"]


def test_a_changed_pom_asks_for_a_new_resolution(tmp_path):
    settings = Settings.from_env({"PERSONALIZE_LIB_DIR": str(tmp_path)})
    folder = tmp_path / "flink"
    folder.mkdir()
    (folder / ".resolved").write_text("an older pom's hash")
    assert any("changed since" in p for p in jars.problems(settings, "flink"))


def test_the_image_marks_its_decode_jar_with_the_hash_make_setup_checks():
    """docker/Dockerfile builds lib/udf without Python: its shell hash must be _pom_hash("udf")."""
    dockerfile = (jars.project_root() / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    pipeline = re.search(r"&& (cat operators/jvm/pom\.xml .*?\| sha256sum \| cut -d' ' -f1)", dockerfile).group(1)
    done = subprocess.run(["bash", "-c", pipeline], cwd=jars.project_root(), capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == jars._pom_hash("udf")


def test_a_changed_decode_source_asks_for_a_new_build(tmp_path):
    settings = Settings.from_env({"PERSONALIZE_LIB_DIR": str(tmp_path)})
    folder = tmp_path / "udf"
    folder.mkdir()
    (folder / ".resolved").write_text("the hash of older sources")
    (folder / "personalize-decode.jar").write_bytes(b"")
    assert any(p.startswith(f"{jars.UDF} changed since") for p in jars.problems(settings, "udf"))
