"""``personalize replay FILE``: a real event log, in event-time order, as Avro to ``events``.

Formats (detected from the header or the file name):
- canonical CSV (DESIGN.md): ``event_time,event_type,user_id,session_id,product_id,category,price,quantity``
  (+ optional ``consent_personalization``, ``consent_marketing``; absent = true);
- REES46 CSV: ``event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session``;
- Taobao UserBehavior JSON lines: ``user_id,item_id,category_id,behavior,ts``.

A row that cannot be read is counted and reported with its line number, never
dropped in silence. Each event's id is ``<file name>:<line>``, so a replay of the
same file produces the same ids.
"""

from __future__ import annotations

import csv
import datetime as dt
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from personalize import kafkaio, logs
from personalize.errors import PersonalizeError
from personalize.settings import Settings

log = logs.get(__name__)

CANONICAL = ["event_time", "event_type", "user_id", "session_id", "product_id", "category", "price", "quantity"]
REES46 = ["event_time", "event_type", "product_id", "category_id", "category_code", "brand", "price", "user_id",
          "user_session"]
EVENT_TYPES = {"page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout", "purchase", "search"}
REES46_TYPES = {"view": "product_view", "cart": "add_to_cart", "remove_from_cart": "remove_from_cart",
                "purchase": "purchase"}
TAOBAO_TYPES = {"pv": "product_view", "fav": "product_view", "cart": "add_to_cart", "buy": "purchase"}


class RowError(ValueError):
    pass


@dataclass
class ParseResult:
    format: str
    events: list[dict] = field(default_factory=list)
    bad_rows: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)


def parse_time(text: str) -> int:
    """ISO-8601 (``Z``, offset or `` UTC`` suffix; naive = UTC) or epoch milliseconds."""
    text = text.strip()
    if not text:
        raise RowError("empty event_time")
    if text.isdigit():
        return int(text)
    if text.endswith(" UTC"):
        text = text[:-4]
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RowError(f"event_time {text!r} is neither ISO-8601 nor epoch milliseconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1000)


def _price(text: str | None) -> float | None:
    if text is None or not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise RowError(f"price {text!r} is not a number") from None


def _bool(text: str | None, name: str) -> bool:
    if text is None or text.strip() == "":
        return True
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise RowError(f"{name} {text!r} is not true/false")


def _event(event_id: str, event_type: str, user_id: str, event_time: int, *, session_id=None, product_id=None,
           category=None, price=None, quantity=1, consent_personalization=True, consent_marketing=True) -> dict:
    if not user_id:
        raise RowError("empty user_id")
    return {
        "event_id": event_id,
        "event_type": event_type,
        "user_id": user_id,
        "session_id": session_id or None,
        "event_time": event_time,
        "product_id": product_id or None,
        "category": category or None,
        "price": price,
        "quantity": quantity,
        "consent_analytics": True,
        "consent_personalization": consent_personalization,
        "consent_marketing": consent_marketing,
        "context": None,
    }


def _canonical_row(name: str, line: int, row: dict) -> dict:
    etype = row["event_type"].strip()
    if etype not in EVENT_TYPES:
        raise RowError(f"unknown event_type {etype!r}")
    qty_text = (row.get("quantity") or "").strip()
    try:
        quantity = int(qty_text) if qty_text else 1
    except ValueError:
        raise RowError(f"quantity {qty_text!r} is not a whole number") from None
    return _event(
        f"{name}:{line}", etype, row["user_id"].strip(), parse_time(row["event_time"]),
        session_id=row.get("session_id"), product_id=row.get("product_id"), category=row.get("category"),
        price=_price(row.get("price")), quantity=quantity,
        consent_personalization=_bool(row.get("consent_personalization"), "consent_personalization"),
        consent_marketing=_bool(row.get("consent_marketing"), "consent_marketing"),
    )


def _rees46_row(name: str, line: int, row: dict) -> dict:
    etype = REES46_TYPES.get(row["event_type"].strip())
    if etype is None:
        raise RowError(f"unknown REES46 event_type {row['event_type']!r}")
    return _event(
        f"{name}:{line}", etype, row["user_id"].strip(), parse_time(row["event_time"]),
        session_id=row["user_session"], product_id=row["product_id"],
        category=row["category_code"] or row["category_id"], price=_price(row["price"]),
    )


def _csv(path: Path, name: str) -> ParseResult:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if header == REES46:
            fmt, convert = "rees46", _rees46_row
        elif header[: len(CANONICAL)] == CANONICAL:
            fmt, convert = "canonical", _canonical_row
        else:
            raise PersonalizeError(
                f"{path}: unknown CSV header {','.join(header)!r}; expected the canonical columns "
                f"{','.join(CANONICAL)} or the REES46 ones"
            )
        result = ParseResult(fmt)
        for row in reader:
            line = reader.line_num
            if len(row) != len(header):
                result.bad_rows.append((line, f"{len(row)} fields, expected {len(header)}"))
                continue
            try:
                result.events.append(convert(name, line, dict(zip(header, row))))
            except RowError as exc:
                result.bad_rows.append((line, str(exc)))
    return result


def _taobao(path: Path, name: str) -> ParseResult:
    result = ParseResult("taobao")
    with open(path, "rb") as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = orjson.loads(raw)
                etype = TAOBAO_TYPES.get(row["behavior"])
                if etype is None:
                    raise RowError(f"unknown behavior {row['behavior']!r}")
                result.events.append(_event(
                    f"{name}:{line}", etype, str(row["user_id"]), parse_time(row["ts"]),
                    product_id=str(row["item_id"]), category=str(row["category_id"]),
                ))
            except (orjson.JSONDecodeError, KeyError, TypeError, RowError) as exc:
                why = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                result.bad_rows.append((line, why))
    return result


def parse(path: Path) -> ParseResult:
    """Every event of the file, sorted by event time (stable: file order breaks ties)."""
    if not path.is_file():
        raise PersonalizeError(f"{path}: no such file")
    name = path.name
    result = _taobao(path, name) if path.suffix in (".jsonl", ".json") else _csv(path, name)
    result.events.sort(key=lambda e: e["event_time"])
    return result


def replay(settings: Settings, path: Path, topic: str | None = None, progress=sys.stderr) -> tuple[ParseResult, float]:
    """Parse ``path`` and produce its events to ``topic`` (default: the events topic). Returns (result, events/s)."""
    import schemas

    from personalize import topics

    topic = topic or settings.topic_events
    result = parse(path)
    topics.ensure(settings, [topic], local_stack=True)
    for line, why in result.bad_rows[:20]:
        log.warning("unreadable row", file=str(path), line=line, reason=why)
    codec = schemas.codec("user_event")
    started = time.monotonic()
    total = len(result.events)

    def records() -> Iterator[tuple[bytes, bytes, int]]:
        for i, event in enumerate(result.events, start=1):
            if progress and i % 50_000 == 0:
                rate = i / (time.monotonic() - started)
                print(f"replay: {i}/{total} events ({rate:,.0f}/s)", file=progress, flush=True)
            yield event["user_id"].encode(), codec.encode(event), event["event_time"]

    sent = kafkaio.produce(settings, topic, records())
    rate = sent / max(time.monotonic() - started, 1e-9)
    return result, rate
