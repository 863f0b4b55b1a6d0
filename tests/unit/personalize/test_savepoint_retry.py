"""Which refusals of a savepoint mean "again, once the tasks run" (personalize.flink.tasks_starting)."""

from personalize.flink import tasks_starting

# as Flink 2.2.1 words them (the MiniCluster's log, and the REST API's failure cause)
STARTING = (
    "org.apache.flink.runtime.checkpoint.CheckpointException: Checkpoint triggering task session fields, "
    "models, segments, cart-abandonment triggers -> Calc[35] (1/1) of job 1a2e78057696619a58360b329f77ae68 "
    "is not being executed at the moment. Aborting checkpoint. Failure reason: Not all required tasks are "
    "currently running."
)
OTHER = ("org.apache.flink.runtime.checkpoint.CheckpointException: Checkpoint expired before completing.",
         "java.io.IOException: No space left on device")


def test_a_task_still_starting_is_waited_for():
    assert tasks_starting(RuntimeError(STARTING))
    assert tasks_starting(STARTING)  # the REST API's stack trace, as text


def test_any_other_refusal_is_not():
    assert not any(tasks_starting(RuntimeError(reason)) for reason in OTHER)
