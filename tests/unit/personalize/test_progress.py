"""The progress line of a bounded run: share, rate and time left from events read."""

from __future__ import annotations

from personalize.run import progress_line


def test_progress_says_share_rate_and_time_left():
    assert progress_line(352_375, 885_427, 25.0) == \
        "progress: 352,375 of 885,427 events (39.8 %), 14,095 events/s, ~38 s left"


def test_when_every_event_is_read_the_windows_are_closing():
    assert progress_line(10, 10, 2.0) == "progress: 10 of 10 events (100.0 %), 5 events/s, windows closing"
