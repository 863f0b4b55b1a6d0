"""Closed sessions -> models, segments, triggers: the keyed Python step.

Closed sessions (rows of ``operators.sessions``) go through ``close_sessions`` in
order: the propensity model scores each, the segmenter re-scores the user, a
segment that held long enough becomes a ``SegmentChange``, an abandoned cart a
``Trigger``; both models learn per mini-batch of consented sessions (scored before
they learn: progressive validation). Consent: without personalization consent
nothing is scored, learned, kept in the user's history or written to the profile;
without marketing consent no trigger.

In Flink the models are one global object, so the step runs keyed by a constant
(one busy subtask, DESIGN.md). Session rows come in batches gathered in the JVM
(``jobs.profile.model_batches``: ``model_batch`` rows, or ``model_flush_ms`` after
a batch's first, or at end of input), and each batch runs through the models in the
call that receives it, so the models are written to state once a batch, not once a
session, and a checkpoint holds a batch either before this step or in the models it
changed: a restore resumes the same models exactly.
"""

from __future__ import annotations

import numpy as np
import orjson

import schemas
from operators import models as m
from operators import triggers
from operators.sessions import COLUMN_SEP, unpack
from personalize.settings import Settings

# what the step emits: one row per closed session (its profile part, and its trigger
# and segment change when it has them), and one model snapshot row per batch; the
# SQL splits them to their sinks. One row rather than one per output halves the
# rows that cross back from Python.
ACTION_COLUMNS = (
    ("user_id", "STRING"),          # the Kafka key of every output about the user
    ("profile", "BYTES"),           # JSON profile fields
    ("trigger", "BYTES"),           # Avro Trigger
    ("segment_change", "BYTES"),    # Avro SegmentChange
    ("snapshot", "BYTES"),          # JSON model snapshot (snapshot rows only)
    ("ts_ms", "BIGINT"),            # event time: the record timestamp on Kafka
    # an erasure's tombstone row: the profile part whose key (the user id) it deletes, on
    # this step's changelog or the live one; the row of the sessions part also deletes the
    # user's key on triggers and segment changes
    ("tombstone", "STRING"),
)
SNAPSHOT_KEY = "models"
PROFILE_PART = "sessions"
# the live changelog's part (operators/live.py: keyed by the user id alone), then this step's
LIVE_PART = "live"
PROFILE_PARTS = (LIVE_PART, PROFILE_PART)
TOP_CATEGORIES = 3
# an erasure request among the packed session rows: the mark, then user_id and requested_ms
# joined by the column separator (``erasure_rows``)
ERASURE_MARK = "\x1c"


def erasure_rows(view: str) -> str:
    """The erasure requests of ``view`` (user_id, requested_ms) as packed rows for this step."""
    mark, sep = (f"U&'\\{ord(c):04X}'" for c in (ERASURE_MARK, COLUMN_SEP))
    return f"SELECT CONCAT({mark}, user_id, {sep}, CAST(requested_ms AS STRING)) AS session FROM {view}"


def split_erasures(rows: list[str]) -> tuple[list[dict], dict[str, int]]:
    """The sessions of a batch of packed rows, and its erasures (user -> newest requested_ms).

    A session of a user erased in the batch is dropped when it began before the erasure
    (its epoch is older): it holds data the user asked to be forgotten (a later session
    carries the erasure's time as its epoch, whatever its place in the batch)."""
    erased: dict[str, int] = {}
    packed = []
    for row in rows:
        if isinstance(row, str) and row.startswith(ERASURE_MARK):
            user, requested = row[1:].split(COLUMN_SEP)
            erased[user] = max(erased.get(user, 0), int(requested))
        else:
            packed.append(row)
    sessions = [s for s in map(unpack, packed) if s["epoch"] >= erased.get(s["user_id"], 0)]
    return sessions, erased


def tombstones(user: str, requested_ms: int) -> list[tuple]:
    """The ACTION_COLUMNS rows that delete a forgotten user's keys on the keyed outputs."""
    return [(user, None, None, None, None, requested_ms, part) for part in PROFILE_PARTS]


def session_fields(after: m.UserHistory, end_ms: int, epoch: int = 0) -> dict:
    """The profile's session fields from the user's history after its newest (consented:
    only those are written) closed session. ``consent_ms``, the session's last event time,
    orders the part against consent changes in the Redis loader, ``epoch`` (the user's
    erasure the session began after) against erasures; neither is a profile field."""
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
        "consent": True,
        "consent_ms": end_ms,
        "epoch": epoch,
    }
    for rank, (name, count) in enumerate(after.top_categories(TOP_CATEGORIES), start=1):
        fields[f"top_category_{rank}"] = name
        fields[f"top_category_{rank}_events"] = count
    return fields


def segment_change(header: bytes, user: str, old: str | None, new: str, name: str | None, changed_ms: int,
                   version: str) -> bytes:
    """A SegmentChange record's bytes (schemas/segment_change.avsc, field by field: a third of
    fastavro's per-record cost; held to its bytes by tests/unit/operators/test_actions.py)."""
    return b"".join((header, schemas.string_bytes(user), schemas.optional_string_bytes(old),
                     schemas.string_bytes(new), schemas.optional_string_bytes(name), schemas.long_bytes(changed_ms),
                     schemas.string_bytes(version)))


def close_sessions(models: m.Models, histories: dict, sessions: list[dict], settings: Settings,
                   codecs) -> list[tuple]:
    """Run closed sessions, in order, through the models; one output row (ACTION_COLUMNS) each.

    ``histories`` maps user id -> UserHistory (None or absent: a new user) and is
    updated in place. The sessions are cut where the models' mini-batch fills, so each
    is scored with the models as learned from every consented session before its
    mini-batch: the result depends on the order of the sessions, not on how they are
    handed in."""
    out: list[tuple] = []
    i = 0
    while i < len(sessions):
        room, j = models.room(), i
        while j < len(sessions) and room:
            room -= 1 if sessions[j]["consent_personalization"] else 0
            j += 1
        out.extend(_close_chunk(models, histories, sessions[i:j], settings, codecs))
        models.learn_pending()
        i = j
    return out


def _close_chunk(models: m.Models, histories: dict, sessions: list[dict], settings: Settings, codecs) -> list[tuple]:
    # 1. per session, in order: features from the history before it, then fold it in
    xp, xs, labels, fields_of = [], [], [], []
    for session in sessions:
        user = session["user_id"]
        history = histories.get(user)
        if history is None:
            history = histories[user] = m.UserHistory()
        if session["consent_personalization"]:
            # the features as the JVM computed them at the close; a row of an earlier release
            # (restored from its savepoint) has none: computed here, from the same history
            x = session.get("propensity_x")
            xp.append(x if x is not None else m.propensity_features(session, history))
            before_end = history.last_end_ms
            categories = history.fold(session)
            x = session.get("segment_x")
            xs.append(x if x is not None else m.segment_features(session, history, before_end, categories))
            labels.append(session["n_purchases"] > 0)
            fields_of.append(session_fields(history, session["end_ms"], session.get("epoch", 0)))
        else:  # a session without consent is not kept in the user's history, and writes nothing
            fields_of.append(None)
    # 2. the whole chunk scored at once, with the models as they are before it
    propensities = models.propensity.predict_proba_many(np.array(xp)) if xp else ()
    candidates = models.segmenter.predict_many(np.array(xs)) if xs else ()
    seg = models.segmenter
    # 3. per session, in order: segment (debounced), profile fields, trigger
    if xp:  # progressive validation: each score counted with its label before anything learns it
        models.propensity.scores.update_many(np.round(propensities, 6), np.array(labels))
    rows = []
    k = 0
    for n, session in enumerate(sessions):
        user = session["user_id"]
        history = histories[user]
        fields = fields_of[n]
        closed_ms = session["end_ms"] + settings.session_gap_ms
        propensity = segment = change = None
        if session["consent_personalization"]:
            # six decimals, the same in the profile and the trigger (and whatever the chunk's
            # shape: a matrix product may differ in the last bit)
            propensity = round(float(propensities[k]), 6)
            old = history.segment
            history, changed = m.debounce(history, candidates[k], settings.segment_debounce)
            if changed:
                if old is not None:
                    models.segment_sizes[old] -= 1
                    models.segment_moves += 1
                models.segment_sizes[history.segment] += 1
                change = segment_change(codecs["segment_change"].header, user, old, history.segment,
                                        seg.names.get(history.segment), closed_ms, seg.version)
            segment = history.segment
            fields["propensity"] = f"{propensity:.6f}"
            fields["propensity_ms"] = closed_ms
            if segment is not None:
                fields["segment"] = segment
                fields["segment_name"] = seg.names.get(segment, "")
            models.pending_p.append(xp[k])
            models.pending_s.append(xs[k])
            models.pending_y.append(labels[k])
            models.scored += 1
            k += 1
        elif history.segment is not None:  # consent withdrawn: the user leaves its segment
            models.segment_sizes[history.segment] -= 1
            history.segment, history.pending, history.pending_count = None, None, 0
        if "trigger_prefix" in session:  # the JVM's part of the trigger due (None: none due)
            prefix = session["trigger_prefix"]
            trigger = triggers.complete(codecs["trigger"].header, prefix, propensity, segment,
                                        closed_ms) if prefix else None
        else:  # a row of an earlier release: the whole trigger here
            due = triggers.abandonment(session, settings.session_gap_ms, propensity, segment)
            trigger = codecs["trigger"].encode(due) if due is not None else None
        models.sessions += 1
        models.updated_ms = max(models.updated_ms, closed_ms)
        profile = orjson.dumps(fields) if fields is not None else None
        rows.append((user, profile, trigger, change, None, closed_ms, None))
    return rows


def snapshot_row(models: m.Models) -> tuple:
    return (SNAPSHOT_KEY, None, None, None, orjson.dumps(models.snapshot()), models.updated_ms, None)


def actions_function(settings: Settings):
    """The Flink KeyedProcessFunction (built here so importing this module starts no JVM)."""
    from pyflink.common import Row, Types
    from pyflink.datastream import KeyedProcessFunction
    from pyflink.common.time import Time
    from pyflink.datastream.state import ListStateDescriptor, MapStateDescriptor, StateTtlConfig, ValueStateDescriptor

    class CloseSessions(KeyedProcessFunction):
        def open(self, runtime_context):
            import schemas

            # the models' libraries load when the step opens, not on the first closed session
            # (River imports SciPy and pandas: ~1 s of this thread that would hold up that batch)
            import pandas  # noqa: F401
            from river import linear_model, optim  # noqa: F401

            self.codecs = {"trigger": schemas.codec("trigger"), "segment_change": schemas.codec("segment_change")}
            # values are explicit, versioned bytes (models.STATE_FORMAT) inside the pickled type
            # the job has always declared, so savepoints of earlier versions still restore
            self.models_state = runtime_context.get_state(ValueStateDescriptor("models", Types.PICKLED_BYTE_ARRAY()))
            histories = MapStateDescriptor("histories", Types.STRING(), Types.PICKLED_BYTE_ARRAY())
            if settings.state_ttl_ms:
                # each user's entry expires settings.state_ttl_ms after its last write, like the
                # SQL aggregate's state and the Redis profile (never read back once expired)
                histories.enable_time_to_live(
                    StateTtlConfig.new_builder(Time.milliseconds(settings.state_ttl_ms))
                    .set_update_type(StateTtlConfig.UpdateType.OnCreateAndWrite)
                    .set_state_visibility(StateTtlConfig.StateVisibility.NeverReturnExpired)
                    # no background cleanup: PyFlink 2.2.1's default one builds a RocksDB strategy
                    # whose Duration needs a Py4J gateway, which a cluster TaskManager's embedded
                    # Python has not (the task fails in open()); and incremental cleanup of a map
                    # under the one constant key scans the whole map on every access (the bench
                    # ran 3.4 times slower). Expired entries are never read back, left out of
                    # every full snapshot, and so leave memory at a restore
                    .disable_cleanup_in_background()
                    .cleanup_full_snapshot()
                    .build())
            self.histories = runtime_context.get_map_state(histories)
            # rows an earlier release kept here until its batch filled (restored from its
            # savepoint): they go first, with the first batch this process runs
            self.buffer = runtime_context.get_list_state(ListStateDescriptor("buffer", Types.PICKLED_BYTE_ARRAY()))
            self.held_checked = False
            self.models = None  # read from state once per process, written back every batch

        def process_element(self, batch, ctx):
            # the packed session strings (operators.sessions) and erasures (erasure_rows) of a
            # batch, in order (jobs.profile.model_batches)
            yield from self._flush(list(batch))

        def on_timer(self, timestamp, ctx):
            # a timer an earlier release registered for the rows it kept here
            yield from self._flush([])

        def _flush(self, rows):
            if not self.held_checked:
                self.held_checked = True
                held = list(self.buffer.get() or ())
                if held:
                    self.buffer.clear()
                    rows = held + rows
            if not rows:
                return
            if self.models is None:
                self.models = m.Models.from_state(self.models_state.value(), settings.segment_count,
                                                  settings.segment_batch)
            sessions, erased = split_erasures(rows)
            histories = {}
            # forgotten users: their history and segment membership go, their keys get
            # tombstones (before any output of a session after the erasure)
            for user, requested_ms in erased.items():
                old = m.UserHistory.from_state(self.histories.get(user))
                if old is not None and old.segment is not None:
                    self.models.segment_sizes[old.segment] -= 1
                self.histories.remove(user)
                for out in tombstones(user, requested_ms):
                    yield Row(*out)
            for session in sessions:
                user = session["user_id"]
                if user not in histories:
                    histories[user] = None if user in erased else m.UserHistory.from_state(self.histories.get(user))
            for out in close_sessions(self.models, histories, sessions, settings, self.codecs):
                yield Row(*out)
            if histories:
                self.histories.put_all({user: h.to_state() for user, h in histories.items()})
            self.models_state.update(self.models.to_state())
            yield Row(*snapshot_row(self.models))

    return CloseSessions()
