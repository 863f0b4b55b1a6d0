"""Single-object Avro encoding of UserEvent: round trip, header, and every way bytes can be bad."""

from __future__ import annotations

import datetime as dt
import json
import struct
from pathlib import Path

import pytest
from fastavro.schema import parse_schema, to_parsing_canonical_form

import schemas
from schemas import Codec, DecodeError

EMPTY64 = 0xC15D213AA4D7A795
MASK = (1 << 64) - 1


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO, written out from the Avro specification (independent of fastavro)."""
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY64 if fp & 1 else 0)
        table.append(fp & MASK)
    fp = EMPTY64
    for byte in data:
        fp = ((fp >> 8) ^ table[(fp ^ byte) & 0xFF]) & MASK
    return fp


def event(**overrides) -> dict:
    record = {
        "event_id": "e1",
        "event_type": "add_to_cart",
        "user_id": "u1",
        "session_id": None,
        "event_time": 1_569_888_000_123,
        "product_id": "p1",
        "category": "electronics",
        "price": 12.5,
        "quantity": 2,
        "consent_analytics": True,
        "consent_personalization": True,
        "consent_marketing": False,
        "context": {"device": "mobile", "country": "DE", "referrer": None},
    }
    record.update(overrides)
    return record


def test_round_trip_keeps_every_field_with_times_as_epoch_millis():
    codec = schemas.codec("user_event")
    assert codec.decode(codec.encode(event())) == event()


def test_datetimes_encode_to_the_same_millis():
    codec = schemas.codec("user_event")
    when = dt.datetime(2019, 10, 1, 0, 0, 0, 123000, tzinfo=dt.timezone.utc)
    assert codec.decode(codec.encode(event(event_time=when)))["event_time"] == 1_569_888_000_123


def test_header_is_marker_then_little_endian_crc64_avro_fingerprint():
    codec = schemas.codec("user_event")
    data = codec.encode(event())
    canonical = to_parsing_canonical_form(parse_schema(json.loads(Path(schemas.HERE, "user_event.avsc").read_text())))
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == struct.pack("<Q", crc64_avro(canonical.encode()))


def test_crc64_avro_matches_the_specification_test_vector():
    # the Avro spec's fingerprint of the schema "int" in parsing canonical form
    assert crc64_avro(b'"int"') == 0x7275D51A3F395C8F


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "not single-object encoded: 0 bytes"),
        (b"\x00\x01" + b"\x00" * 20, "marker 0001 is not c301"),
        (b"\xc3\x01" + b"\xff" * 8 + b"\x00", "unknown schema fingerprint ffffffffffffffff"),
    ],
)
def test_bad_headers_are_refused_with_a_reason(data, reason):
    with pytest.raises(DecodeError) as info:
        schemas.codec("user_event").decode(data)
    assert reason in info.value.reason


def test_truncated_datum_is_refused_with_a_reason():
    codec = schemas.codec("user_event")
    data = codec.encode(event())
    with pytest.raises(DecodeError) as info:
        codec.decode(data[:-12])
    assert "invalid Avro datum for user_event" in info.value.reason


def test_trailing_bytes_are_refused_with_a_reason():
    codec = schemas.codec("user_event")
    with pytest.raises(DecodeError) as info:
        codec.decode(codec.encode(event()) + b"\x00\x00")
    assert "2 trailing bytes" in info.value.reason


def _writing_with(schema: dict) -> Codec:
    """A user_event codec that encodes with ``schema`` (another producer's version)."""
    codec = Codec.__new__(Codec)
    codec.name = "user_event"
    codec.schema = parse_schema(schema)
    codec.fingerprint = schemas._fingerprint(codec.schema)
    codec._header = schemas.MARKER + codec.fingerprint
    codec.writers = {codec.fingerprint: codec.schema}
    return codec


def writer(path: Path) -> Codec:
    """A codec that writes with an older kept version (as an old producer would)."""
    return _writing_with(json.loads(path.read_text()))


def test_the_first_version_is_a_real_older_schema_whose_data_resolves_to_the_current_one():
    """v1 lacks consent_analytics and context: reading its data takes their defaults."""
    current = schemas.codec("user_event")
    v1 = writer(Path(schemas.HERE, "versions", "user_event.v1.avsc"))
    assert v1.fingerprint != current.fingerprint and v1.fingerprint in current.writers
    sent = {k: v for k, v in event().items() if k not in ("consent_analytics", "context")}
    data = v1.encode(sent)
    assert data[2:10] == v1.fingerprint
    decoded = current.decode(data)
    assert decoded == {**sent, "consent_analytics": True, "context": None}


def test_data_written_with_every_kept_version_reads_with_the_current_one():
    current = schemas.codec("user_event")
    versions = sorted(Path(schemas.HERE, "versions").glob("user_event.v*.avsc"))
    assert versions, "the first version must be kept in schemas/versions"
    for path in versions:
        decoded = current.decode(writer(path).encode(event()))
        assert decoded["event_id"] == "e1" and decoded["user_id"] == "u1", path.name


def test_a_newer_writer_with_an_added_defaulted_field_is_refused_until_kept():
    """An unknown version is a dead letter, never guessed at."""
    schema = json.loads(Path(schemas.HERE, "user_event.avsc").read_text())
    schema["fields"].append({"name": "coupon", "type": ["null", "string"], "default": None})
    newer = _writing_with(schema)
    with pytest.raises(DecodeError) as info:
        schemas.codec("user_event").decode(newer.encode(event(coupon="X")))
    assert "unknown schema fingerprint" in info.value.reason


def test_the_hand_written_avro_kinds_are_fastavro_s_bytes():
    import io

    import fastavro

    def fast(schema, value):
        out = io.BytesIO()
        fastavro.schemaless_writer(out, parse_schema(schema), value)
        return out.getvalue()

    for n in (0, 1, -1, 63, 64, -64, -65, 1_700_000_000_000, -1_700_000_000_000, 2**62, -(2**63), 2**63 - 1):
        assert schemas.long_bytes(n) == fast("long", n)
    for s in ("", "a", "ü😀", "x" * 200):
        assert schemas.string_bytes(s) == fast("string", s)
        assert schemas.optional_string_bytes(s) == fast(["null", "string"], s)
    assert schemas.optional_string_bytes(None) == fast(["null", "string"], None)
    for x in (None, 0.0, 0.123456, 1.0, -2.5e-300):
        assert schemas.optional_double_bytes(x) == fast(["null", "double"], x)
