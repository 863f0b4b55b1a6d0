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

# what the step emits, split by kind in SQL
ACTION_COLUMNS = (
    ("kind", "STRING"),       # trigger | segment_change | profile | models
    ("user_id", "STRING"),
    ("value", "BYTES"),       # Avro Trigger / SegmentChange, JSON model snapshot
    ("ts_ms", "BIGINT"),      # event time: the record timestamp on Kafka
    ("fields", "MAP<STRING, STRING>"),  # profile fields (kind profile)
)
SNAPSHOT_KEY = "models"
END_OF_INPUT = 2**63 - 1


def close_session(models: m.Models, history: m.UserHistory | None, session: dict, settings: Settings,
                  codecs) -> tuple[m.UserHistory, list[tuple]]:
    """Run one closed session through the models; the user's new history and the output rows."""
    before = history or m.UserHistory()
    after = before.after(session)
    closed_ms = session["end_ms"] + settings.session_gap_ms
    out: list[tuple] = []
    propensity = segment = None
    lines = triggers.net_cart(session["cart_moves"])  # parsed once for the features and the trigger
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
            change = {
                "user_id": session["user_id"], "old_segment": old, "new_segment": after.segment,
                "new_segment_name": models.segmenter.names.get(after.segment),
                "changed_ms": closed_ms, "model_version": models.segmenter.version,
            }
            out.append(("segment_change", session["user_id"], codecs["segment_change"].encode(change), closed_ms, None))
        segment = after.segment
        fields = {"propensity": f"{propensity:.6f}", "propensity_ms": str(closed_ms), "consent": "true"}
        if segment is not None:
            fields["segment"] = segment
            fields["segment_name"] = models.segmenter.names.get(segment, "")
        out.append(("profile", session["user_id"], None, closed_ms, fields))
    elif after.segment is not None:  # consent withdrawn: the user leaves its segment
        models.segment_sizes[after.segment] -= 1
        after.segment, after.pending, after.pending_count = None, None, 0
    trigger = triggers.abandonment(session, settings.session_gap_ms, propensity, segment, lines=lines)
    if trigger is not None:
        out.append(("trigger", session["user_id"], codecs["trigger"].encode(trigger), closed_ms, None))
    models.sessions += 1
    models.updated_ms = max(models.updated_ms, closed_ms)
    return after, out


def snapshot_row(models: m.Models) -> tuple:
    return ("models", SNAPSHOT_KEY, orjson.dumps(models.snapshot()), models.updated_ms, None)


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
                for kind, key, value, ts_ms, fields in out:
                    yield Row(kind, key, value, ts_ms, fields)
            self.histories.put_all(seen)
            self.models.update(models)
            yield Row(*snapshot_row(models))

    return CloseSessions()
