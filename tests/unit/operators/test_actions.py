"""Closed sessions through the models: what is written for each consent, and that
scoring, learning and segment changes happen only with personalization consent."""

import orjson

import schemas
from operators import actions
from operators import models as m
from operators.sessions import FIELD_SEP, ITEM_SEP
from personalize.settings import Settings

SETTINGS = Settings(segment_batch=2, segment_debounce=1)
CODECS = {"trigger": schemas.codec("trigger"), "segment_change": schemas.codec("segment_change")}


def session(user="u1", start=0, **over):
    base = {"user_id": user, "start_ms": start, "end_ms": start + 600_000, "n_events": 5, "n_page_views": 1,
            "n_product_views": 3, "n_searches": 0, "n_cart_adds": 1, "n_cart_removes": 0, "n_checkouts": 0,
            "n_purchases": 0, "revenue_cents": 0, "outcome_ms": None,
            "cart_moves": FIELD_SEP.join(("+", "p1", "1", "1000", str(start + 1))), "categories": "a",
            "viewed": FIELD_SEP.join(("p1", "a", str(start))),
            "consent_personalization": True, "consent_marketing": True}
    base.update(over)
    return base


def parts(out):
    """The output row as a dict of ACTION_COLUMNS, with the profile JSON and the Avro records decoded."""
    row = dict(zip([c for c, _ in actions.ACTION_COLUMNS], out))
    row["profile"] = orjson.loads(row["profile"]) if row["profile"] else None
    row["trigger"] = CODECS["trigger"].decode(row["trigger"]) if row["trigger"] else None
    row["segment_change"] = CODECS["segment_change"].decode(row["segment_change"]) if row["segment_change"] else None
    return row


def close(models, histories, *sessions):
    return [parts(out) for out in actions.close_sessions(models, histories, list(sessions), SETTINGS, CODECS)]


def test_a_consented_abandoned_session_is_scored_learned_and_triggers():
    models, histories = m.Models.new(k=2, batch=1, warmup=1), {}
    (row,) = close(models, histories, session())
    profile, trigger = row["profile"], row["trigger"]
    assert profile["propensity"] == "0.500000" and profile["consent"] is True  # an untrained model: weights 0
    assert trigger["propensity"] == float(profile["propensity"]) and row["ts_ms"] == trigger["emitted_ms"]
    assert row["user_id"] == "u1"  # the Kafka key of the profile part, the trigger and the segment change
    # batch 1: learned at once
    assert models.propensity.scores.samples == 1 and histories["u1"].sessions == 1 and not models.pending_y


def test_session_fields_fold_every_closed_session_of_the_user_once():
    models, histories = m.Models.new(k=2, batch=2), {}
    lengths = (600_000, 60_000, 1_000)
    rows = close(models, histories, *(
        session(start=i * 10_000_000, end_ms=i * 10_000_000 + length, n_events=i + 2, n_purchases=i % 2,
                revenue_cents=1234 * (i % 2), categories=ITEM_SEP.join("bba"[: i + 1]))
        for i, length in enumerate(lengths)))
    assert [r["profile"]["n_sessions"] for r in rows] == [1, 2, 3]
    profile = rows[-1]["profile"]
    assert profile["n_sessions"] == 3 and profile["session_ms_total"] == sum(lengths)
    assert profile["avg_session_ms"] == sum(lengths) // 3 and profile["avg_session_s"] == "220.333"
    assert (profile["last_session_start_ms"], profile["last_session_events"], profile["last_session_purchases"],
            profile["last_session_revenue"]) == (20_000_000, 4, 0, "0.00")
    # categories over all sessions: b, b+b, b+b+a -> b 5, a 1
    assert (profile["top_category_1"], profile["top_category_1_events"]) == ("b", 5)
    assert (profile["top_category_2"], profile["top_category_2_events"]) == ("a", 1)
    assert "top_category_3" not in profile


def test_the_result_does_not_depend_on_how_the_sessions_are_handed_in():
    many = [session(user=f"u{i % 7}", start=i * 10_000_000, n_purchases=i % 3 == 0, n_events=2 + i % 5,
                    n_cart_adds=i % 4) for i in range(40)]
    at_once, _ = m.Models.new(k=2, batch=4, warmup=8), {}
    one_by_one, _ = m.Models.new(k=2, batch=4, warmup=8), {}
    h1, h2 = {}, {}
    rows1 = close(at_once, h1, *many)
    rows2 = [r for s in many for r in close(one_by_one, h2, s)]
    assert rows1 == rows2 and at_once.snapshot() == one_by_one.snapshot()
    # what was learned is the same to the bit (the metrics' float sums may differ in the last bit)
    assert at_once.propensity.to_state()["weights"] == one_by_one.propensity.to_state()["weights"]
    assert at_once.segmenter.to_state() == one_by_one.segmenter.to_state()


def test_segment_changes_are_emitted_once_a_segment_is_assigned():
    models, histories = m.Models.new(k=2, batch=2, warmup=2), {}
    rows = close(models, histories, *(session(start=i * 10_000_000, n_events=2 + 3 * (i % 2)) for i in range(8)))
    emitted = [r["segment_change"] for r in rows if r["segment_change"]]
    # the first change assigns a segment; each later one moves from the previous; the last is the user's
    assert emitted and emitted[0]["old_segment"] is None and emitted[-1]["new_segment"] == histories["u1"].segment
    assert [c["old_segment"] for c in emitted[1:]] == [c["new_segment"] for c in emitted[:-1]]
    assert sum(models.segment_sizes.values()) == 1
    assert models.snapshot()["segments"][histories["u1"].segment]["users"] == 1
    assert models.segment_moves == len(emitted) - 1


def test_without_personalization_consent_nothing_is_scored_learned_or_profiled():
    models = m.Models.new(k=2, batch=2)
    # marketing consent still allows the trigger, without score or segment; no profile
    # part, and the session is not kept in the user's history
    histories = {}
    (row,) = close(models, histories, session(consent_personalization=False))
    assert row["trigger"]["propensity"] is None and row["trigger"]["segment"] is None
    assert row["profile"] is None and row["segment_change"] is None
    assert models.propensity.scores.samples == 0 and models.pending_y == [] and models.scored == 0
    assert histories["u1"].sessions == 0 and histories["u1"].categories is None


def test_a_session_without_consent_leaves_the_session_fields_of_the_consented_ones():
    models, histories = m.Models.new(k=2, batch=2), {}
    close(models, histories, session(start=0))
    close(models, histories, session(start=10_000_000, consent_personalization=False))
    (row,) = close(models, histories, session(start=20_000_000))
    assert row["profile"]["n_sessions"] == 2 and row["profile"]["last_session_start_ms"] == 20_000_000


def test_without_marketing_consent_no_trigger():
    (row,) = close(m.Models.new(k=2, batch=2), {}, session(consent_marketing=False))
    assert row["trigger"] is None and row["profile"]["consent"] is True


def test_withdrawn_personalization_takes_the_user_out_of_its_segment():
    models, histories = m.Models.new(k=2, batch=1, warmup=2), {}
    close(models, histories, *(session(start=i * 10_000_000) for i in range(4)))
    assert histories["u1"].segment is not None and sum(models.segment_sizes.values()) == 1
    (row,) = close(models, histories, session(start=99_000_000, consent_personalization=False))
    assert histories["u1"].segment is None and sum(models.segment_sizes.values()) == 0
    assert row["profile"] is None


def packed(s: dict) -> str:
    """A session as the SQL packs it (operators.sessions.session_closes)."""
    from operators.sessions import COLUMN_SEP, SESSION_COLUMNS

    def text(value):
        return "" if value is None else ("1" if value is True else "0" if value is False else str(value))

    return COLUMN_SEP.join(text(s.get(name)) for name, _ in SESSION_COLUMNS)


def test_an_erasure_drops_the_user_s_sessions_of_before_it_wherever_they_sit_in_the_batch():
    from operators.sessions import COLUMN_SEP

    erasure = f"{actions.ERASURE_MARK}u1{COLUMN_SEP}5000"
    rows = [packed(session("u1", 0, epoch=0)), erasure, packed(session("u1", 9000, epoch=0)),
            packed(session("u1", 7000, epoch=5000)), packed(session("u2", 0, epoch=0))]
    sessions, erased = actions.split_erasures(rows)
    assert erased == {"u1": 5000}
    # both epoch-0 sessions of u1 hold state begun before the erasure (the second one's
    # events were read before the job knew of it); the one after it and u2's stay, in order
    assert [(s["user_id"], s["start_ms"], s["epoch"]) for s in sessions] == [("u1", 7000, 5000), ("u2", 0, 0)]


def test_tombstones_delete_every_profile_part_and_the_user_s_output_keys_under_the_user_id():
    rows = [dict(zip([c for c, _ in actions.ACTION_COLUMNS], out)) for out in actions.tombstones("ü 1", 42)]
    assert [r["tombstone"] for r in rows] == ["live", "sessions"]
    assert all(r["profile"] is r["trigger"] is r["segment_change"] is r["snapshot"] is None for r in rows)
    assert {(r["user_id"], r["ts_ms"]) for r in rows} == {("ü 1", 42)}


def test_the_sessions_part_carries_its_epoch_for_the_loader():
    out = close(m.Models.new(k=2, batch=2), {}, session("u1", 0, epoch=777))
    assert out[0]["profile"]["epoch"] == 777


def test_a_segment_change_written_field_by_field_is_fastavro_s_record():
    codec = CODECS["segment_change"]
    for user, old, new, name, at, version in (
            ("u1", None, "s0", None, 0, "minibatch-kmeans-k4-b0"),
            ("ü😀", "s3", "s1", "big spender, frequent visitor", 1_700_000_000_123, "v"),
            ("u" * 300, "s1", "s2", "", -5, "minibatch-kmeans-k4-b123456")):
        record = {"user_id": user, "old_segment": old, "new_segment": new, "new_segment_name": name,
                  "changed_ms": at, "model_version": version}
        assert actions.segment_change(codec.header, user, old, new, name, at, version) == codec.encode(record)
