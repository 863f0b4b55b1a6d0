"""With PERSONALIZE_PSEUDONYM_KEY the job keeps no raw user id: the Taobao log through the
whole job, and every key and user field in Redis and in the output topics is the keyed
HMAC of an id of the file (computed here with hmac, not with the code's helper), the
profiles hold the file's counts under those keys, and ``personalize profile`` takes the
raw id."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import Counter

import pytest

import schemas
from personalize import credentials, kafkaio
from tests.integration.test_profile_job import job_stack, run_bounded
from tests.integration.test_taobao_job import TAOBAO, taobao_events

pytestmark = pytest.mark.slow

KEY = "pseudonym-key-for-the-test-7d1c"


def hmac_id(user_id: str) -> str:
    return hmac.new(KEY.encode(), user_id.encode(), hashlib.sha256).hexdigest()[:32]


@pytest.fixture(scope="module")
def pseudonymised(stack):
    own = job_stack(stack, redis_db=6, PERSONALIZE_PSEUDONYM_KEY=KEY)
    done = own.cli("replay", str(TAOBAO))
    assert done.returncode == 0, done.stderr
    return own, run_bounded(own)


def test_redis_and_every_output_topic_hold_pseudonyms_only(pseudonymised):
    own, summary = pseudonymised
    events = taobao_events()
    raw = {e["user_id"] for e in events}
    alias = {hmac_id(u): u for u in raw}
    assert summary["events read"] == 1000 and summary["dead letters"] == 0
    r = credentials.redis_client(own.settings, decode_responses=True)
    keys = list(r.scan_iter("*", count=1000))
    users_in_keys = {k.split(":", 1)[1] for k in keys if k.startswith("profile:")}
    assert users_in_keys == set(alias) and len(users_in_keys) == 945
    assert not [k for k in keys if set(k.replace(":", " ").replace("_", " ").split()) & raw]
    counts = Counter(e["user_id"] for e in events)
    for pseudonym, user in alias.items():
        assert int(r.hget(f"profile:{pseudonym}", "n_events")) == counts[user], user
    stream = [fields for _, fields in r.xrange("triggers:cart_abandonment")]
    assert stream and {f["user_id"] for f in stream} <= set(alias)

    trigger, change = schemas.codec("trigger"), schemas.codec("segment_change")
    topics = {own.settings.topic_triggers: trigger.decode, own.settings.topic_segment_changes: change.decode,
              own.settings.topic_profile_updates: None}
    seen = 0
    for topic, decode in topics.items():
        for record in kafkaio.read_to_end(own.settings, topic):
            user = record.key.decode()  # every output about a user is keyed by its (pseudonymous) id
            assert user in alias, (topic, record.key)
            if decode is not None:
                assert decode(record.value)["user_id"] == user
            seen += 1
    assert seen > 945


def test_profile_takes_the_raw_id_and_shows_its_pseudonym(pseudonymised):
    own, _ = pseudonymised
    user = taobao_events()[0]["user_id"]
    done = own.cli("profile", user)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["user_id"] == user and shown["pseudonym"] == hmac_id(user)
    assert int(shown["n_events"]) == sum(1 for e in taobao_events() if e["user_id"] == user)
    assert KEY not in done.stdout + done.stderr


def test_the_api_takes_the_raw_id_and_answers_the_pseudonyms_profile(pseudonymised):
    from personalize.flink import free_port
    from tests.integration.test_serve import get, start_api, stop

    own, _ = pseudonymised
    counts = Counter(e["user_id"] for e in taobao_events())
    port = free_port()
    api = start_api(own, port)
    try:
        for user in sorted(counts)[:20]:
            status, _, body = get(port, f"/v1/users/{user}")
            assert status == 200 and body["user_id"] == user and body["n_events"] == counts[user], (user, body)
            assert get(port, f"/v1/users/{hmac_id(user)}")[0] == 404  # the pseudonym is no raw id
    finally:
        stop(api)
