"""The CLI answers bad arguments and bad settings with one line, never a traceback."""

from __future__ import annotations

import pytest

from personalize import cli


def test_bad_setting_is_one_line_with_exit_code_2(monkeypatch, capsys):
    monkeypatch.setenv("PERSONALIZE_KAFKA_PORT", "not-a-port")
    assert cli.main(["stack", "status"]) == 2
    err = capsys.readouterr().err
    assert err == "personalize: error: PERSONALIZE_KAFKA_PORT must be an integer, got 'not-a-port'\n"


def test_unknown_stack_action_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["stack", "sideways"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'sideways'" in err and "Traceback" not in err


def test_negative_message_count_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["smoke", "--messages", "-3"])
    assert "must be 0 or more, got -3" in capsys.readouterr().err


def test_a_savepoint_path_with_no_savepoint_is_one_line(tmp_path, capsys):
    assert cli.main(["run", "--from-savepoint", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no savepoint there" in err and "Traceback" not in err


def test_a_restore_flink_refused_reads_as_its_reason_without_flinks_own_cli_hint():
    from personalize.flink import restore_refused

    text = ("org.apache.flink.table.api.TableException: Failed to execute sql\n\tat org.apache...\n"
            "Caused by: org.apache.flink.util.FlinkException: Failed to execute job 'personalize'.\n"
            "Caused by: java.lang.IllegalStateException: Failed to rollback to checkpoint/savepoint file:/sp. "
            "Cannot map checkpoint/savepoint state for operator ac61 to the new program, because the operator is "
            "not available in the new program. If you want to allow to skip this, you can set the "
            "--allowNonRestoredState option on the CLI.\n\tat org.apache...")
    assert restore_refused(Exception(text)) == (
        "Failed to rollback to checkpoint/savepoint file:/sp. Cannot map checkpoint/savepoint state for operator "
        "ac61 to the new program, because the operator is not available in the new program.")
    assert restore_refused(Exception("Caused by: java.io.IOException: disk full")) is None
