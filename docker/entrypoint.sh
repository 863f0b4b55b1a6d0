#!/bin/sh
# The job image's roles:
#   jobmanager | taskmanager   a Flink process of the standalone cluster, in the foreground,
#                              configured by `python -m personalize.cluster write-conf`
#   anything else              `personalize ARGS` (submit, load --follow, stop --savepoint, ...):
#                              the same code path the cluster tests run
set -eu
FLINK_HOME=$(python -c 'import pathlib, pyflink; print(pathlib.Path(pyflink.__file__).parent)')
export FLINK_HOME
case "${1:-}" in
  jobmanager|taskmanager)
    role=$1
    shift
    python -m personalize.cluster write-conf "$FLINK_CONF_DIR" \
      --host "${FLINK_JOBMANAGER_HOST:-jobmanager}" --bind 0.0.0.0
    exec "$FLINK_HOME/bin/$role.sh" start-foreground "$@"
    ;;
  *)
    exec personalize "$@"
    ;;
esac
