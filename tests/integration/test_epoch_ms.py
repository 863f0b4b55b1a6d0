"""Window ends, dead-letter times and the timestamp check turn Flink timestamps into epoch
milliseconds in SQL (``operators.windows.epoch_ms``). TIMESTAMPDIFF returns INT: a
formula on seconds since 1970 overflowed after 2038-01-19 (2040-01-01 came out as
-2,085,978,495,877). Checked by Flink itself, against Python's datetime."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

TIMES = ("1960-03-01 01:02:03.004", "1969-12-31 23:59:59.999", "1970-01-01 00:00:00.000",
         "2019-10-01 13:45:07.500", "2038-01-19 03:14:08.001", "2040-01-01 00:00:00.123", "9999-12-31 23:59:59.999")

SCRIPT = """
import sys
from pyflink.table import EnvironmentSettings, TableEnvironment
from operators.windows import epoch_ms
t = TableEnvironment.create(EnvironmentSettings.in_batch_mode())
t.get_config().set("table.local-time-zone", "UTC")
values = ", ".join(f"(TIMESTAMP '{x}')" for x in sys.argv[1:])
query = (f"SELECT {epoch_ms('ts')}, {epoch_ms('CAST(ts AS TIMESTAMP_LTZ(3))')} "
         f"FROM (VALUES {values}) AS v(ts)")
for row in t.execute_sql(query).collect():
    print(row[0], row[1])
"""


def test_epoch_ms_is_exact_before_1970_after_2038_and_to_year_9999():
    done = subprocess.run([sys.executable, "-c", SCRIPT, *TIMES], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = [tuple(int(x) for x in line.split()) for line in done.stdout.split("\n") if line.strip()]
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    want = [round((dt.datetime.strptime(x, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.timezone.utc) - epoch)
                  / dt.timedelta(milliseconds=1)) for x in TIMES]
    assert sorted(got) == sorted((w, w) for w in want)
