#!/usr/bin/env bash
# `make run`: the stack up, the REES46 sample and a short synthetic stream into
# `events` (once: skipped when the topic already holds records), the profile job
# bounded on the embedded Flink, then the run summary, a few profiles and
# triggers, and the models (segment sizes, propensity metrics).
set -euo pipefail
cd "$(dirname "$0")/.."
P=.venv/bin/personalize
$P stack up
if ! $P replay ../shared/data/rees46-2019-10-01.csv --if-empty | tee /dev/stderr | grep -q "already holds"; then
  $P produce --users 500 --start-ms 1569900000000
fi
$P run --bounded | tee .stack/last-run.txt
echo
echo "a few profiles (personalize profile USER_ID):"
for user in 541312140 554748717 user-1 user-2; do
  $P profile "$user" || true
done
echo
echo "a few cart-abandonment triggers (personalize triggers --limit 3):"
$P triggers --limit 3
echo
echo "models (personalize models):"
$P models
