"""The API's pure parts: the profile hash typed, the session in progress nested, a trigger
entry typed, trending lists ranked without excluded products, and the API's settings checked."""

import pytest

from personalize.errors import ConfigError
from personalize.serve import rank_trending, stream_id, typed_profile, typed_trigger, user_categories
from personalize.settings import Settings


def test_a_profile_hash_becomes_typed_json_with_the_session_in_progress_nested():
    raw = {"version": "17000000000012", "n_events": "23", "n_purchase": "1", "revenue": "12.50",
           "revenue_cents": "1250", "events_by_hour": ",".join(["0"] * 23 + ["4"]), "active_hours": "23",
           "propensity": "0.123456", "segment": "s3", "segment_name": "night browsers", "top_category_1": "42",
           "top_category_1_events": "7", "avg_session_s": "61.250", "session_start_ms": "1700000000000",
           "session_events": "3", "session_cart": '[{"product_id":"p1","quantity":2,"price":"3.50"}]',
           "session_cart_value": "7.00", "session_top_category": "shoes", "session_propensity": "0.5",
           "window_extra": "kept as text"}
    got = typed_profile(raw)
    assert got["version"] == 17000000000012 and got["n_events"] == 23 and got["n_purchase"] == 1
    assert got["revenue"] == 12.5 and got["revenue_cents"] == 1250 and got["propensity"] == 0.123456
    assert got["events_by_hour"] == [0] * 23 + [4] and got["active_hours"] == [23]
    assert got["top_category_1"] == "42"  # a category named by digits stays a name
    assert got["top_category_1_events"] == 7 and got["avg_session_s"] == 61.25
    assert got["window_extra"] == "kept as text"
    assert not any(name.startswith("session_") and name != "session_ms_total" for name in got)
    assert got["session"] == {"start_ms": 1700000000000, "events": 3, "product_views": None, "products": None,
                              "cart": [{"product_id": "p1", "quantity": 2, "price": 3.5}], "cart_value": 7.0,
                              "last_cart_add_ms": None, "top_category": "shoes", "propensity": 0.5}


def test_no_session_in_progress_is_null_and_an_unparsable_value_stays_its_string():
    got = typed_profile({"n_events": "lots", "active_hours": "", "session_ms_total": "5000"})
    assert got == {"n_events": "lots", "active_hours": [], "session_ms_total": 5000, "session": None}


def test_a_trigger_entry_becomes_typed_json():
    got = typed_trigger({"trigger_id": "t", "kind": "cart_abandonment", "user_id": "7", "session_start_ms": "1",
                         "session_end_ms": "2", "emitted_ms": "3", "cart_value": "10.00", "propensity": "0.25",
                         "segment": "s1", "cart": '[{"product_id":"p","quantity":"2","price":"5.00"}]'})
    assert got == {"trigger_id": "t", "kind": "cart_abandonment", "user_id": "7", "session_start_ms": 1,
                   "session_end_ms": 2, "emitted_ms": 3, "cart_value": 10.0, "propensity": 0.25, "segment": "s1",
                   "cart": [{"product_id": "p", "quantity": 2, "price": 5.0}]}


def test_trending_ranked_by_views_each_product_once_without_the_excluded():
    lists = {"a": [("p1", 9.0), ("p2", 5.0), ("p3", 5.0)], "b": [("p2", 7.0), ("p4", 1.0)]}
    assert rank_trending(lists, exclude={"p1"}, n=3) == [
        {"product_id": "p2", "category": "b", "views": 7},
        {"product_id": "p3", "category": "a", "views": 5},
        {"product_id": "p4", "category": "b", "views": 1}]
    assert rank_trending(lists, exclude=set(), n=1) == [{"product_id": "p1", "category": "a", "views": 9}]
    assert rank_trending({}, exclude=set(), n=5) == []


def test_the_sessions_category_comes_first_then_the_closed_sessions_top_three_once_each():
    profile = {"session": {"top_category": "b"}, "top_category_1": "a", "top_category_2": "b", "top_category_3": "c"}
    assert user_categories(profile) == ["b", "a", "c"]
    assert user_categories({"session": None}) == []


def test_stream_ids_order_by_time_then_sequence():
    assert stream_id("1700000000000-2") > stream_id("1700000000000-1") > stream_id("999-9")
    assert sorted(["10-0", "9-5", "10-1"], key=stream_id) == ["9-5", "10-0", "10-1"]


@pytest.mark.parametrize("env, message", [
    ({"PERSONALIZE_API_TOKENS": "short"}, "PERSONALIZE_API_TOKENS must be comma-separated tokens of at least 16"),
    ({"PERSONALIZE_API_TOKENS": "a-good-long-token-1,has a space in it!"}, "PERSONALIZE_API_TOKENS"),
    ({"PERSONALIZE_API_CORS_ORIGINS": "shop.example"}, "PERSONALIZE_API_CORS_ORIGINS must be origins"),
    ({"PERSONALIZE_API_PORT": "70000"}, "PERSONALIZE_API_PORT must be a port"),
    ({"PERSONALIZE_API_MAX_LOADER_LAG": "-1"}, "PERSONALIZE_API_MAX_LOADER_LAG must be 0"),
    ({"PERSONALIZE_METRICS_PORT": "65530"}, "PERSONALIZE_METRICS_PORT must be 0 .no metrics. or a port up to 65516"),
])
def test_a_bad_api_setting_is_one_error_naming_it(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_api_tokens_are_several_and_secret():
    s = Settings.from_env({"PERSONALIZE_API_TOKENS": " first-token-0123456789 , second-token-0123456789 ",
                           "PERSONALIZE_API_CORS_ORIGINS": "https://shop.example/, http://localhost:3000"})
    assert s.api_token_list == ("first-token-0123456789", "second-token-0123456789")
    assert s.api_cors_origin_list == ("https://shop.example", "http://localhost:3000")
    assert s.redact("Bearer second-token-0123456789") == "Bearer ***"
    assert "first-token" not in repr(s)
