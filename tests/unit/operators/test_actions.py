"""One closed session through the models: what is written for each consent, and
that scoring, learning and segment changes happen only with personalization consent."""

import schemas
from operators import actions
from operators import models as m
from operators.sessions import FIELD_SEP
from personalize.settings import Settings

SETTINGS = Settings(segment_batch=2, segment_debounce=1)
CODECS = {"trigger": schemas.codec("trigger"), "segment_change": schemas.codec("segment_change")}


def session(user="u1", start=0, **over):
    base = {"user_id": user, "start_ms": start, "end_ms": start + 600_000, "n_events": 5, "n_page_views": 1,
            "n_product_views": 3, "n_searches": 0, "n_cart_adds": 1, "n_cart_removes": 0, "n_checkouts": 0,
            "n_purchases": 0, "revenue_cents": 0, "browse_end_ms": start + 600_000,
            "cart_moves": FIELD_SEP.join(("+", "p1", "1", "1000", str(start + 1))), "categories": "a",
            "consent_personalization": True, "consent_marketing": True}
    base.update(over)
    return base


def kinds(out):
    return [row[0] for row in out]


def test_a_consented_abandoned_session_is_scored_learned_and_triggers():
    models = m.Models.new(k=2, batch=2)
    history, out = actions.close_session(models, None, session(), SETTINGS, CODECS)
    assert kinds(out) == ["profile", "trigger"]
    profile = out[0][4]
    assert 0 < float(profile["propensity"]) < 1 and profile["consent"] == "true"
    trigger = CODECS["trigger"].decode(out[1][2])
    assert trigger["propensity"] == float(profile["propensity"]) and out[1][3] == trigger["emitted_ms"]
    assert models.propensity.samples == 1 and history.sessions == 1


def test_segment_changes_are_emitted_once_a_segment_is_assigned():
    models = m.Models.new(k=2, batch=2)
    history = None
    emitted = []
    for i in range(4):
        history, out = actions.close_session(models, history, session(start=i * 10_000_000), SETTINGS, CODECS)
        emitted += [CODECS["segment_change"].decode(r[2]) for r in out if r[0] == "segment_change"]
    assert emitted and emitted[0]["old_segment"] is None and emitted[0]["new_segment"] == history.segment
    assert sum(models.segment_sizes.values()) == 1
    assert models.snapshot()["segments"][history.segment]["users"] == 1


def test_without_personalization_consent_nothing_is_scored_learned_or_profiled():
    models = m.Models.new(k=2, batch=2)
    _, out = actions.close_session(models, None, session(consent_personalization=False), SETTINGS, CODECS)
    assert kinds(out) == ["trigger"]  # marketing consent still allows the trigger, without score or segment
    trigger = CODECS["trigger"].decode(out[0][2])
    assert trigger["propensity"] is None and trigger["segment"] is None
    assert models.propensity.samples == 0 and models.segmenter.pending == []


def test_without_marketing_consent_no_trigger():
    models = m.Models.new(k=2, batch=2)
    _, out = actions.close_session(models, None, session(consent_marketing=False), SETTINGS, CODECS)
    assert kinds(out) == ["profile"]


def test_withdrawn_personalization_takes_the_user_out_of_its_segment():
    models = m.Models.new(k=2, batch=1)
    history = None
    for i in range(3):
        history, _ = actions.close_session(models, history, session(start=i * 10_000_000), SETTINGS, CODECS)
    assert history.segment is not None and sum(models.segment_sizes.values()) == 1
    history, out = actions.close_session(models, history, session(start=99_000_000, consent_personalization=False),
                                         SETTINGS, CODECS)
    assert history.segment is None and sum(models.segment_sizes.values()) == 0
    assert "profile" not in kinds(out)
