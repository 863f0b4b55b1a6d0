"""Closed sessions -> models, segments, triggers: the keyed Python step.

Every closed session (one row of ``operators.sessions``) goes through
``close_session``: the propensity model predicts, the metrics update and the model
learns the label; the segmenter re-scores the user (and learns per mini-batch);
a segment that held long enough becomes a ``SegmentChange``; an abandoned cart
becomes a ``Trigger``. Consent: without personalization consent nothing is
scored, learned or written to the profile; without marketing consent no trigger.

In Flink the models are one global object, so the step runs keyed by a constant
(one busy subtask, DESIGN.md). Session rows are first appended to a ListState
buffer and run through the models in batches (``model_batch`` rows, or
``model_flush_ms`` later, or at end of input), so the pickled models are written
to state once a batch, not once a session, and a checkpoint always holds models
and unprocessed buffer together: a restore resumes the same models exactly.
"""

from __future__ import annotations

import orjson

from operators import models as m
from operators import triggers
from operators.sessions import SESSION_COLUMNS
from personalize.settings import Settings

# what the step emits: one row per closed session (its profile part, and its trigger
# and segment change when it has them), and one model snapshot row per batch; the
# SQL splits them to their sinks. One row rather than one per output halves the
# rows that cross back from Python.
ACTION_COLUMNS = (
    ("user_id", "STRING"),          # the Kafka key of the trigger and the segment change
    ("profile_key", "STRING"),      # the changelog's JSON key of this step's profile part
    ("profile", "BYTES"),           # JSON profile fields
    ("trigger", "BYTES"),           # Avro Trigger
    ("segment_change", "BYTES"),    # Avro SegmentChange
    ("snapshot", "BYTES"),          # JSON model snapshot (snapshot rows only)
    ("ts_ms", "BIGINT"),            # event time: the record timestamp on Kafka
)
SNAPSHOT_KEY = "models"
END_OF_INPUT = 2**63 - 1
PROFILE_PART = "sessions"
TOP_CATEGORIES = 3


def profile_key(user_id: str) -> str:
    """The changelog key of this step's profile part (the SQL parts' keys have the same shape)."""
    return orjson.dumps({"user_id": user_id, "part": PROFILE_PART}).decode()


def session_fields(after: m.UserHistory, consent: bool) -> dict:
    """The profile's session fields from the user's history after its newest closed session."""
    start, n_events, adds, removes, purchases, revenue = after.last
    avg_ms = after.session_ms_total // after.sessions
    fields = {
        "n_sessions": after.sessions,
        "session_ms_total": after.session_ms_total,
        "avg_session_ms": avg_ms,
        "avg_session_s": f"{avg_ms / 1000:.3f}",
        "last_session_start_ms": start,
        "last_session_events": n_events,
        "last_session_cart_adds": adds,
        "last_session_cart_removes": removes,
        "last_session_purchases": purchases,
        "last_session_revenue": triggers.format_cents(revenue),
        "consent": consent,
    }
    for rank, (name, count) in enumerate(after.top_categories(TOP_CATEGORIES), start=1):
        fields[f"top_category_{rank}"] = name
        fields[f"top_category_{rank}_events"] = count
    return fields


def close_session(models: m.Models, history: m.UserHistory | None, session: dict, settings: Settings,
                  codecs) -> tuple[m.UserHistory, tuple]:
    """Run one closed session through the models; the user's new history and its output row (ACTION_COLUMNS)."""
    before = history or m.UserHistory()
    after = before.after(session)
    closed_ms = session["end_ms"] + settings.session_gap_ms
    user = session["user_id"]
    change = trigger = None
    propensity = segment = None
    lines = triggers.net_cart(session["cart_moves"])  # parsed once for the features and the trigger
    fields = session_fields(after, bool(session["consent_personalization"]))
    if session["consent_personalization"]:
        focus = m.affinity(session["categories"])
        x = m.propensity_features(session, before, lines=lines, focus=focus)
        propensity = models.propensity.predict_one(x)
        models.propensity.learn_one(x, session["n_purchases"] > 0, propensity)
        profile_x = m.segment_features(session, after, before, focus=focus)
        candidate = models.segmenter.predict_one(profile_x)
        models.segmenter.learn_one(profile_x)
        old = after.segment
        after, changed = m.debounce(after, candidate, settings.segment_debounce)
        if changed:
            if old is not None:
                models.segment_sizes[old] -= 1
            models.segment_sizes[after.segment] += 1
            change = codecs["segment_change"].encode({
                "user_id": user, "old_segment": old, "new_segment": after.segment,
                "new_segment_name": models.segmenter.names.get(after.segment),
                "changed_ms": closed_ms, "model_version": models.segmenter.version,
            })
        segment = after.segment
        fields["propensity"] = f"{propensity:.6f}"
        fields["propensity_ms"] = closed_ms
        if segment is not None:
            fields["segment"] = segment
            fields["segment_name"] = models.segmenter.names.get(segment, "")
    elif after.segment is not None:  # consent withdrawn: the user leaves its segment
        models.segment_sizes[after.segment] -= 1
        after.segment, after.pending, after.pending_count = None, None, 0
    due = triggers.abandonment(session, settings.session_gap_ms, propensity, segment, lines=lines)
    if due is not None:
        trigger = codecs["trigger"].encode(due)
    models.sessions += 1
    models.updated_ms = max(models.updated_ms, closed_ms)
    return after, (user, profile_key(user), orjson.dumps(fields), trigger, change, None, closed_ms)


def snapshot_row(models: m.Models) -> tuple:
    return (SNAPSHOT_KEY, None, None, None, None, orjson.dumps(models.snapshot()), models.updated_ms)


def actions_function(settings: Settings):
    """The Flink KeyedProcessFunction (built here so importing this module starts no JVM)."""
    from pyflink.common import Row, Types
    from pyflink.datastream import KeyedProcessFunction
    from pyflink.datastream.state import ListStateDescriptor, MapStateDescriptor, ValueStateDescriptor

    names = [c for c, _ in SESSION_COLUMNS]

    class CloseSessions(KeyedProcessFunction):
        def open(self, runtime_context):
            import schemas

            self.codecs = {"trigger": schemas.codec("trigger"), "segment_change": schemas.codec("segment_change")}
            self.models = runtime_context.get_state(ValueStateDescriptor("models", Types.PICKLED_BYTE_ARRAY()))
            self.histories = runtime_context.get_map_state(
                MapStateDescriptor("histories", Types.STRING(), Types.PICKLED_BYTE_ARRAY()))
            self.buffer = runtime_context.get_list_state(ListStateDescriptor("buffer", Types.PICKLED_BYTE_ARRAY()))
            self.buffered = 0  # since the last flush in this process (a restored buffer flushes on its timer)

        def process_element(self, row, ctx):
            self.buffer.add(tuple(row))
            self.buffered += 1
            if self.buffered == 1:
                ctx.timer_service().register_processing_time_timer(
                    ctx.timer_service().current_processing_time() + settings.model_flush_ms)
                ctx.timer_service().register_event_time_timer(END_OF_INPUT)
            if self.buffered >= settings.model_batch:
                yield from self._flush()

        def on_timer(self, timestamp, ctx):
            yield from self._flush()

        def _flush(self):
            rows = list(self.buffer.get() or ())
            self.buffered = 0
            if not rows:
                return
            self.buffer.clear()
            models = self.models.value() or m.Models.new(settings.segment_count, settings.segment_batch)
            seen: dict[str, m.UserHistory | None] = {}
            for values in rows:
                session = dict(zip(names, values))
                user = session["user_id"]
                if user not in seen:
                    seen[user] = self.histories.get(user)
                seen[user], out = close_session(models, seen[user], session, settings, self.codecs)
                yield Row(*out)
            self.histories.put_all(seen)
            self.models.update(models)
            yield Row(*snapshot_row(models))

    return CloseSessions()
