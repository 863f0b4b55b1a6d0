"""Avro schemas (one ``.avsc`` per record) and their single-object encoding.

Every Kafka record value is Avro single-object encoded (Avro specification):
the marker ``C3 01``, the writer schema's CRC-64-AVRO fingerprint (8 bytes,
little-endian), then the binary datum. A reader finds the writer schema by
fingerprint among the versions kept here (``<name>.avsc`` is the current one,
``versions/<name>.v<N>.avsc`` the earlier ones) and resolves it to the current
one. Schemas are parsed once per process.
"""

from __future__ import annotations

import functools
import io
import json
import struct
from pathlib import Path

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

HERE = Path(__file__).resolve().parent
MARKER = b"\xc3\x01"
HEADER_LEN = 10


class DecodeError(ValueError):
    """Bytes that are not a readable record; ``reason`` says why (for the dead-letter topic)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _without_logical_types(schema):
    """The same schema with logicalType annotations dropped: identical binary layout and
    fingerprint (the parsing canonical form has no logical types), but fastavro reads
    timestamp-millis as plain epoch milliseconds instead of building a datetime per
    record (84k vs 51k records/s here)."""
    if isinstance(schema, list):
        return [_without_logical_types(s) for s in schema]
    if isinstance(schema, dict):
        out = {k: _without_logical_types(v) for k, v in schema.items() if k != "logicalType"}
        if schema.get("logicalType") == "decimal":
            return schema  # keep decimals exact (Decimal), they are rare
        return out
    return schema


def _fingerprint(parsed: dict) -> bytes:
    # fastavro's hex string already lists the bytes little-endian first, as the
    # single-object header wants them (checked against the spec in the tests)
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


# Avro's binary encoding of the few kinds the hot outputs need, for records written field by
# field where fastavro's per-record work would cost more than the record (the models step's
# triggers and segment changes); each use is held to fastavro's bytes by a test
def long_bytes(n: int) -> bytes:
    """An Avro long (or int): zigzag, then 7 bits a byte, the least significant first."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z & ~0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def string_bytes(s: str) -> bytes:
    b = s.encode()
    return long_bytes(len(b)) + b


def optional_string_bytes(s: str | None) -> bytes:
    """A ["null", "string"] union."""
    return b"\x00" if s is None else b"\x02" + string_bytes(s)


def optional_double_bytes(x: float | None) -> bytes:
    """A ["null", "double"] union."""
    return b"\x00" if x is None else b"\x02" + struct.pack("<d", x)


class Codec:
    """Encode with the current version of one record schema; decode any kept version."""

    def __init__(self, name: str):
        self.name = name
        raw = json.loads((HERE / f"{name}.avsc").read_text())
        self.schema = parse_schema(raw)
        self.fingerprint = _fingerprint(self.schema)
        # the single-object header every record of this schema starts with
        self.header = self._header = MARKER + self.fingerprint
        self._reader = parse_schema(_without_logical_types(raw))
        # writer schemas by fingerprint, read without logical types (see above)
        self.writers: dict[bytes, dict] = {self.fingerprint: self._reader}
        for path in sorted((HERE / "versions").glob(f"{name}.v*.avsc")):
            old_raw = json.loads(path.read_text())
            fp = _fingerprint(parse_schema(old_raw))
            if fp != self.fingerprint:
                self.writers[fp] = parse_schema(_without_logical_types(old_raw))

    def encode(self, record: dict) -> bytes:
        out = io.BytesIO()
        out.write(self._header)
        fastavro.schemaless_writer(out, self.schema, record)
        return out.getvalue()

    def decode(self, data: bytes) -> dict:
        """The record; timestamp-millis fields come back as epoch milliseconds (int)."""
        if data is None or len(data) < HEADER_LEN:
            raise DecodeError(f"not single-object encoded: {0 if data is None else len(data)} bytes")
        if data[:2] != MARKER:
            raise DecodeError(f"not single-object encoded: marker {data[:2].hex()} is not c301")
        writer = self.writers.get(bytes(data[2:HEADER_LEN]))
        if writer is None:
            raise DecodeError(f"unknown schema fingerprint {bytes(data[2:HEADER_LEN]).hex()} for {self.name}")
        buf = io.BytesIO(data)
        buf.seek(HEADER_LEN)
        try:
            if writer is self._reader:
                record = fastavro.schemaless_reader(buf, writer, None)
            else:
                record = fastavro.schemaless_reader(buf, writer, self._reader)
        except Exception as exc:  # fastavro raises several kinds on bad bytes
            raise DecodeError(f"invalid Avro datum for {self.name}: {type(exc).__name__}: {exc}") from exc
        if buf.tell() != len(data):
            raise DecodeError(f"{len(data) - buf.tell()} trailing bytes after the {self.name} datum")
        return record


@functools.lru_cache(maxsize=None)
def codec(name: str) -> Codec:
    """The process-wide codec of one schema (parsed once)."""
    return Codec(name)
