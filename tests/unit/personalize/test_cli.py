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
