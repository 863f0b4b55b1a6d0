"""Cart abandonment: net cart per product floored at 0, one deterministic trigger per
abandoned session, none for purchased or empty carts or without marketing consent."""

from decimal import Decimal

from operators import triggers
from operators.sessions import FIELD_SEP, ITEM_SEP


def moves(*items):
    return ITEM_SEP.join(FIELD_SEP.join(str(x) for x in item) for item in items)


def session(**over):
    base = {"user_id": "u1", "start_ms": 1_000, "end_ms": 60_000, "n_purchases": 0, "consent_marketing": True,
            "cart_moves": moves(("+", "p1", 2, 1999, 10_000), ("+", "p2", 1, 500, 20_000))}
    base.update(over)
    return base


def test_net_cart_subtracts_removes_per_product_and_floors_at_zero():
    lines = triggers.net_cart(moves(("+", "a", 2, 100, 1), ("-", "a", 1, "", 2), ("-", "b", 3, "", 3),
                                    ("+", "c", 1, 50, 4), ("-", "c", 5, "", 5)))
    assert lines == [("a", 1, 100)]


def test_a_remove_that_arrives_before_its_add_still_cancels_it():
    assert triggers.net_cart(moves(("-", "a", 1, "", 2), ("+", "a", 1, 100, 1))) == []


def test_the_line_price_is_the_latest_add_and_ties_take_the_higher_price():
    assert triggers.net_cart(moves(("+", "a", 1, 300, 5), ("+", "a", 1, 100, 1))) == [("a", 2, 300)]
    assert triggers.net_cart(moves(("+", "a", 1, 100, 5), ("+", "a", 1, 300, 5))) == \
        triggers.net_cart(moves(("+", "a", 1, 300, 5), ("+", "a", 1, 100, 5))) == [("a", 2, 300)]


def test_no_moves_is_an_empty_cart():
    assert triggers.net_cart(None) == [] and triggers.net_cart("") == []


def test_an_abandoned_cart_yields_a_trigger_with_lines_value_and_close_time():
    t = triggers.abandonment(session(), gap_ms=1_800_000, propensity=0.25, segment="s1")
    assert t["trigger_id"] == triggers.trigger_id("u1", 1_000)
    assert t["cart"] == [{"product_id": "p1", "quantity": 2, "price": Decimal("19.99")},
                         {"product_id": "p2", "quantity": 1, "price": Decimal("5.00")}]
    assert t["cart_value"] == Decimal("44.98")
    assert t["emitted_ms"] == 60_000 + 1_800_000
    assert (t["propensity"], t["segment"], t["kind"]) == (0.25, "s1", "cart_abandonment")


def test_trigger_ids_depend_only_on_user_and_session_start():
    assert triggers.trigger_id("u1", 1_000) == triggers.trigger_id("u1", 1_000)
    assert len({triggers.trigger_id("u1", 1_000), triggers.trigger_id("u1", 1_001),
                triggers.trigger_id("u2", 1_000)}) == 3


def test_no_trigger_after_a_purchase_for_an_empty_cart_or_without_marketing_consent():
    assert triggers.abandonment(session(n_purchases=1), 1, None, None) is None
    assert triggers.abandonment(session(cart_moves=moves(("+", "a", 1, 1, 1), ("-", "a", 1, "", 2))), 1, None,
                                None) is None
    assert triggers.abandonment(session(consent_marketing=False), 1, None, None) is None


def test_the_json_form_writes_money_with_two_decimals():
    t = triggers.abandonment(session(), 1, None, None)
    j = triggers.as_json(t)
    assert j["cart_value"] == "44.98" and j["cart"][1]["price"] == "5.00"


def test_a_bots_cart_of_thousands_of_maximal_lines_lists_the_most_valuable_and_still_encodes():
    """A session that never closes can cart thousands of products: 2,000 lines at the price
    and quantity bounds sum past the Trigger's decimal(14,2) (the encode failed and would
    have stopped the job) and the record past Kafka's 1 MB request size."""
    import schemas

    lines = [(f"p{n:05d}", 1_000, 100_000_000 - n) for n in range(2_000)]
    t = triggers.abandonment(session(), gap_ms=1_800_000, propensity=None, segment=None, lines=lines)
    assert [line["product_id"] for line in t["cart"]] == [f"p{n:05d}" for n in range(triggers.MAX_CART_LINES)]
    assert t["cart_value"] == sum(Decimal(1_000) * Decimal(100_000_000 - n).scaleb(-2)
                                  for n in range(triggers.MAX_CART_LINES))
    encoded = schemas.codec("trigger").encode(t)
    assert len(encoded) < 100_000 and schemas.codec("trigger").decode(encoded)["cart_value"] == t["cart_value"]
