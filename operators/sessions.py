"""Closed sessions, one row each, for the models and the cart-abandonment triggers.

The live function (``operators.live``: personalize.profile.LiveProfile in the JVM) emits
one row per closed session, about one per ten events, with what the models and triggers
need: counts, and the cart moves, categories and product views as short strings (each
list keeps its first ``session_list_limit`` items: a session that never closes, a bot's,
holds bounded state). A row crosses into Python as ONE string (the SESSION_COLUMNS joined
by ``COLUMN_SEP``): PyFlink converts a row field by field, and each crossing of a 19-field
row cost more than the models themselves (measured, docs/benchmarks.md). ``unpack``
gives the dict.
"""

from __future__ import annotations

from base64 import b64decode

import numpy as np

# separators inside the listed strings (ASCII unit/record separators: in no id)
FIELD_SEP = "\x1f"
ITEM_SEP = "\x1e"
COLUMN_SEP = "\x1d"

SESSION_COLUMNS = (
    ("user_id", "STRING"),
    ("start_ms", "BIGINT"),
    ("end_ms", "BIGINT"),
    ("n_events", "BIGINT"),
    ("n_page_views", "BIGINT"),
    ("n_product_views", "BIGINT"),
    ("n_searches", "BIGINT"),
    ("n_cart_adds", "BIGINT"),
    ("n_cart_removes", "BIGINT"),
    ("n_checkouts", "BIGINT"),
    ("n_purchases", "BIGINT"),
    ("revenue_cents", "BIGINT"),
    # the first checkout or purchase: the propensity's features read only events before it
    ("outcome_ms", "BIGINT"),
    ("cart_moves", "STRING"),
    ("categories", "STRING"),
    # product views: product, category, event time
    ("viewed", "STRING"),
    ("consent_personalization", "BOOLEAN"),
    ("consent_marketing", "BOOLEAN"),
    # the user's erasure the session began after (0: none; operators.windows, "Erasure")
    ("epoch", "BIGINT"),
    # the models' features (operators.models.PROPENSITY_FEATURES and SEGMENT_FEATURES) as
    # the JVM computed them at the close, where the user's history is (Features.java), as
    # base64 of little-endian doubles: a session with personalization consent only
    ("propensity_x", "DOUBLES"),
    ("segment_x", "DOUBLES"),
    # the cart-abandonment trigger due at the close, as far as the JVM knows it (Abandonment.java):
    # the Avro body of its fields up to cart_value, base64 (operators.triggers.complete)
    ("trigger_prefix", "STRING"),
)


_NAMES = tuple(name for name, _ in SESSION_COLUMNS)
_BIGINTS = tuple(i for i, (_, sql) in enumerate(SESSION_COLUMNS) if sql == "BIGINT")
_STRINGS = tuple(i for i, (_, sql) in enumerate(SESSION_COLUMNS) if sql == "STRING")
_BOOLEANS = tuple(i for i, (_, sql) in enumerate(SESSION_COLUMNS) if sql == "BOOLEAN")
_DOUBLES = tuple(i for i, (_, sql) in enumerate(SESSION_COLUMNS) if sql == "DOUBLES")
# rows of earlier releases (their savepoint's batches): without the features and the trigger
# (19 columns), with the features as text and without the trigger (21)
_WITHOUT_FEATURES, _FEATURES_AS_TEXT = _DOUBLES[0], _DOUBLES[-1] + 1


def unpack(packed: str) -> dict:
    """The SESSION_COLUMNS of a packed closed-session row (UserState.Session.packed in the JVM),
    typed as the JVM wrote them: '' is NULL, booleans are '1'/'0', doubles a list of floats.
    (Column kinds by position: a reader call per column cost the models step a tenth of its
    time.) A row of an earlier release has no ``trigger_prefix`` key: the trigger is computed
    from its cart moves."""
    values: list = packed.split(COLUMN_SEP)
    n = len(values)
    if n != len(_NAMES):
        if n != _FEATURES_AS_TEXT and n != _WITHOUT_FEATURES:
            raise ValueError(f"a closed session of {n} columns, not {len(_NAMES)}")
        values += [""] * (len(_NAMES) - n)
    for i in _BIGINTS:
        values[i] = int(values[i]) if values[i] else None
    for i in _STRINGS:
        values[i] = values[i] or None
    for i in _BOOLEANS:
        values[i] = values[i] == "1"
    for i in _DOUBLES:
        if not values[i]:
            values[i] = None
        elif n == _FEATURES_AS_TEXT:
            values[i] = [float(x) for x in values[i].split(FIELD_SEP)]
        else:
            values[i] = np.frombuffer(b64decode(values[i]), dtype="<f8").tolist()
    session = dict(zip(_NAMES, values))
    if n != len(_NAMES):
        del session["trigger_prefix"]
    return session
