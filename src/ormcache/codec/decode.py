"""Decoding: a payload body back to Python values, one handler per extension code.

:func:`read_body` unpacks a body (whose frame and signature ``wire`` has checked) and
checks its shape and mappers. Instances are not built here: an instance is left as a
:class:`Ref` placeholder and its row as raw values (``memo`` checks them, ``hydrate``
builds them). A handler raises any exception for a value it does not accept; the codec
turns every one into :class:`~ormcache.errors.CorruptPayloadError`.
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
import uuid
import zoneinfo
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import msgpack
from sqlalchemy.engine import Row
from sqlalchemy.engine.result import result_tuple

from ormcache.errors import CorruptPayloadError

from . import wire
from .registry import MapperInfo, Registry


class Ref:
    """An instance reference met while unpacking, before the instances exist."""

    __slots__ = ("idx",)

    def __init__(self, idx: int) -> None:
        self.idx = idx


class Missing:
    """An unloaded column inside a decoded instance row."""


MISSING_VALUE = Missing()

#: Decoded leaves that hold nothing to resolve (walks skip them without a call).
SIMPLE = frozenset((str, int, float, bool, bytes, type(None)))

#: Decoded values that may be shared between decoded copies: nobody can change them in
#: place.
IMMUTABLE = SIMPLE | {dt.datetime, dt.date, dt.time, dt.timedelta, decimal.Decimal, uuid.UUID}

# A zone key names a file in the tz database: allow only what such names look like.
_ZONE_KEY = re.compile(r"^[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*$")

ExtHandler = Callable[["Decoder", bytes], Any]


@lru_cache(maxsize=256)
def row_factory(fields: tuple[str, ...]) -> Callable[[Sequence[Any]], Row[Any]]:
    """SQLAlchemy's Row class for these field names (one per distinct set of names)."""
    return result_tuple(fields)


def _clock(parts: list[Any], parse: Callable[[str], Any]) -> Any:
    """A datetime or time from its clock parts (see ``wire``)."""
    value = parse(parts[0])
    if value.tzinfo is not None:
        raise ValueError("naive part carries a zone")
    fold = parts[1]
    if fold not in (0, 1):
        raise ValueError("fold")
    tz: dt.tzinfo | None = None
    if len(parts) > 2:
        if parts[2] == "z":
            key = parts[3]
            if type(key) is not str or not _ZONE_KEY.match(key) or ".." in key:
                raise ValueError("zone")
            tz = zoneinfo.ZoneInfo(key)
        elif parts[2] == "o":
            offset = dt.timedelta(microseconds=parts[3])
            tz = dt.timezone(offset, parts[4]) if parts[4] is not None else dt.timezone(offset)
        else:
            raise ValueError("tz kind")
    return value.replace(tzinfo=tz, fold=fold)


class Decoder:
    """One decode call: msgpack's extension hook, and what it met on the way."""

    __slots__ = ("custom", "depth", "refs", "registry")

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        #: Instance references met (a payload without instances must have none).
        self.refs = 0
        #: Whether a custom type was decoded (such values are never memoized).
        self.custom = False
        #: msgpack unpackers running, each inside the last one's extension hook.
        self.depth = 0

    def unpack(self, data: bytes) -> Any:
        # The body, the extensions the encoder may nest, and a clock or timedelta inside
        # the last: beyond that a payload is hostile, and every level costs C stack.
        if self.depth > wire.MAX_EXT_DEPTH + 1:
            raise CorruptPayloadError("payload extensions nest deeper than the format allows")
        self.depth += 1
        value = msgpack.unpackb(
            data, ext_hook=self.ext, raw=False, strict_map_key=False, use_list=True
        )
        self.depth -= 1
        return value

    def unpack_list(self, data: bytes, what: str) -> list[Any]:
        items = self.unpack(data)
        if type(items) is not list:
            raise ValueError(what)
        return items

    def ext(self, code: int, data: bytes) -> Any:
        handler = _EXT_HANDLERS.get(code)
        if handler is None:
            raise ValueError(f"unknown extension {code}")
        return handler(self, data)

    def dec_instance(self, data: bytes) -> Ref:
        if len(data) != 4:
            raise ValueError("instance reference")
        self.refs += 1
        return Ref(int.from_bytes(data, "big"))

    def dec_datetime_iso(self, data: bytes) -> dt.datetime:
        value = dt.datetime.fromisoformat(data.decode("ascii"))
        tz = value.tzinfo
        if tz is not None and type(tz) is not dt.timezone:
            raise ValueError("datetime zone")
        return value

    def dec_tuple(self, data: bytes) -> tuple[Any, ...]:
        return tuple(self.unpack_list(data, "tuple"))

    def dec_set(self, data: bytes) -> set[Any]:
        return set(self.unpack_list(data, "set"))

    def dec_frozenset(self, data: bytes) -> frozenset[Any]:
        return frozenset(self.unpack_list(data, "set"))

    def dec_datetime(self, data: bytes) -> dt.datetime:
        return _clock(self.unpack(data), dt.datetime.fromisoformat)  # type: ignore[no-any-return]

    def dec_date(self, data: bytes) -> dt.date:
        return dt.date.fromisoformat(data.decode("ascii"))

    def dec_time(self, data: bytes) -> dt.time:
        return _clock(self.unpack(data), dt.time.fromisoformat)  # type: ignore[no-any-return]

    def dec_timedelta(self, data: bytes) -> dt.timedelta:
        days, seconds, micros = self.unpack(data)
        return dt.timedelta(days=days, seconds=seconds, microseconds=micros)

    def dec_decimal(self, data: bytes) -> decimal.Decimal:
        return decimal.Decimal(data.decode("ascii"))

    def dec_uuid(self, data: bytes) -> uuid.UUID:
        return uuid.UUID(bytes=data)

    def dec_bigint(self, data: bytes) -> int:
        return int.from_bytes(data, "big", signed=True)

    def dec_row(self, data: bytes) -> Row[Any]:
        fields, values = self.unpack(data)
        if not all(type(f) is str for f in fields) or len(fields) != len(values):
            raise ValueError("row")
        return row_factory(tuple(fields))(values)

    def dec_enum(self, data: bytes) -> Any:
        name, value = self.unpack(data)
        cls = self.registry.find_enum(name)
        if cls is None:
            raise ValueError("unknown enum")
        return cls(value)

    def dec_custom(self, data: bytes) -> Any:
        name, value = self.unpack(data)
        decode = self.registry.custom_by_name.get(name)
        if decode is None:
            raise ValueError("unknown custom type")
        # Custom values may be mutable in ways a rebuild cannot see: never memoized.
        self.custom = True
        return decode(value)

    def dec_missing(self, data: bytes) -> Missing:
        return MISSING_VALUE


# IDENTITY is absent on purpose: the canonical form is never decoded.
_EXT_HANDLERS: dict[int, ExtHandler] = {
    wire.INSTANCE: Decoder.dec_instance,
    wire.DATETIME_ISO: Decoder.dec_datetime_iso,
    wire.TUPLE: Decoder.dec_tuple,
    wire.SET: Decoder.dec_set,
    wire.FROZENSET: Decoder.dec_frozenset,
    wire.DATETIME: Decoder.dec_datetime,
    wire.DATE: Decoder.dec_date,
    wire.TIME: Decoder.dec_time,
    wire.TIMEDELTA: Decoder.dec_timedelta,
    wire.DECIMAL: Decoder.dec_decimal,
    wire.UUID: Decoder.dec_uuid,
    wire.BIGINT: Decoder.dec_bigint,
    wire.ROW: Decoder.dec_row,
    wire.ENUM: Decoder.dec_enum,
    wire.CUSTOM: Decoder.dec_custom,
    wire.MISSING: Decoder.dec_missing,
}


class Body(NamedTuple):
    """An unpacked payload body: instances still raw (``memo.Parsed`` checks them)."""

    mappers: list[MapperInfo]
    instances: list[Any]
    root: Any
    #: Whether a custom type was decoded (never memoized).
    custom: bool


def read_body(body: bytes, registry: Registry) -> Body:
    """Unpack a body and check its shape; every mapper it names must be known here,
    with the schema it was written with."""
    dec = Decoder(registry)
    parts = dec.unpack(body)
    if type(parts) is not list or len(parts) != 3:
        raise CorruptPayloadError("malformed payload body")
    mappers_raw, instances_raw, root = parts
    if type(mappers_raw) is not list or type(instances_raw) is not list:
        raise CorruptPayloadError("malformed payload header")
    if not instances_raw:
        if dec.refs:
            raise CorruptPayloadError("instance reference without instances")
        return Body([], [], root, dec.custom)
    infos = []
    for entry in mappers_raw:
        key, fingerprint = entry
        info = registry.find_mapper(key)
        if info is None:
            raise CorruptPayloadError("payload names a mapper this process does not know")
        if info.fingerprint != fingerprint:
            raise CorruptPayloadError("schema changed since the payload was written")
        infos.append(info)
    return Body(infos, instances_raw, root, dec.custom)
