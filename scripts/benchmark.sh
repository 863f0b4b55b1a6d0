#!/usr/bin/env bash
# Benchmark of the bounded profile job (a benchmark, not a test):
#   USERS synthetic users, one session each (~8.7 events a user), on the local
#   stack, into topics and a Redis database of its own; prints the run summary.
# Then the windows alone over as many events (scripts/bench_windows.py): the ceiling.
# Usage: scripts/benchmark.sh [USERS]   (default 115000: about 1,000,000 events)
set -euo pipefail
cd "$(dirname "$0")/.."
users=${1:-115000}; shift || true
tag=bench-$(date +%s)
export PERSONALIZE_TOPIC_EVENTS=$tag-events PERSONALIZE_TOPIC_DLQ=$tag-dlq
export PERSONALIZE_TOPIC_PROFILE_UPDATES=$tag-profiles PERSONALIZE_TOPIC_TRENDING=$tag-trending
export PERSONALIZE_TOPIC_TRIGGERS=$tag-triggers PERSONALIZE_TOPIC_SEGMENT_CHANGES=$tag-segments
port=${PERSONALIZE_REDIS_PORT:-6379}
export PERSONALIZE_REDIS_URL=redis://127.0.0.1:$port/9
.venv/bin/personalize stack up >/dev/null
redis-cli -p "$port" -n 9 flushdb >/dev/null
.venv/bin/personalize produce --users "$users" --sessions 1
.venv/bin/personalize run --bounded "$@"
# the ceiling: the same windows over as many events, JVM only (no Kafka, no Python per event)
.venv/bin/python scripts/bench_windows.py $((users * 87 / 10)) "$users"
