"""Encoding: a Python value to msgpack-native objects, one handler per type.

:class:`Encoder` looks a value's exact type up in its ``table``; what no exact type
names (mapped instances, Row and Enum subclasses, custom types) is matched in
:meth:`Encoder.enc_other`, and anything else is refused with an
:class:`~ormcache.errors.UncacheableValueError` that names where the value sits and
what to do instead. ``canonical`` reuses the walk for hashing arguments into keys.

Nesting is bounded (``wire.MAX_DEPTH``, extensions counting ``wire.EXT_LEVEL``) and
text that UTF-8 cannot encode is refused, so what msgpack cannot pack never escapes as
anything but an UncacheableValueError.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
import zoneinfo
from collections.abc import Callable
from typing import Any, ClassVar

import msgpack
from sqlalchemy.engine import Row
from sqlalchemy.orm.state import InstanceState

from ormcache.errors import UncacheableValueError

from . import wire
from .registry import CustomType, MapperInfo, Registry
from .wire import pack

SA_STATE = "_sa_instance_state"

#: Types msgpack stores as they are: returned untouched, without a handler call.
NATIVE = frozenset((str, float, bool, bytes, type(None)))

# (encoder, value, path) -> msgpack-native value; the encoder is Any so that a
# subclass table can hold the subclass's own methods.
Handler = Callable[[Any, Any, str], Any]

# Types refused with a fix of their own, tried in order (the catch-all comes last).
_REFUSALS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (
        InstanceState,
        "{path} is SQLAlchemy internal state; return the object or ormcache.as_dict(obj)",
    ),
    (
        dict,
        "{path} is a {name}, which would come back as a plain dict; "
        "convert it with dict(...) first",
    ),
    ((bytearray, memoryview), "{path} is a {name}; return bytes(...) instead"),
    (
        object,
        "{path} is a {module}.{qualname}, which ormcache cannot store; convert it to a "
        "supported type or register it with cache.register_type()",
    ),
)


def _offset_name(offset: dt.timedelta | None) -> str | None:
    """The default name of a whole-minute offset, or None (which never matches a name)."""
    if offset is None or offset.microseconds or offset.seconds % 60:
        return None
    return dt.timezone(offset).tzname(None)


def _clock_parts(v: dt.datetime | dt.time, path: str) -> list[Any]:
    """A datetime's or time's clock parts (see ``wire``): the zone by key or offset."""
    tz = v.tzinfo
    if tz is None:
        return [v.isoformat(), v.fold]
    naive = v.replace(tzinfo=None).isoformat()
    if isinstance(tz, zoneinfo.ZoneInfo) and tz.key is not None:
        return [naive, v.fold, "z", tz.key]
    offset = v.utcoffset()
    if offset is None:
        raise UncacheableValueError(f"{path} has a tzinfo without an offset", path=path)
    name = v.tzname() if isinstance(tz, dt.timezone) else None
    if name == dt.timezone(offset).tzname(None):
        name = None
    return [naive, v.fold, "o", int(offset / dt.timedelta(microseconds=1)), name]


def too_deep(path: str) -> UncacheableValueError:
    """The refusal of a value nested deeper than the format allows (see ``wire``)."""
    return UncacheableValueError(
        f"{path} nests deeper than ormcache stores (at most {wire.MAX_DEPTH} levels, "
        f"where a tuple, set, row, enum or custom value counts {wire.EXT_LEVEL}); "
        "return a flatter value",
        path=path,
    )


class Encoder:
    """One encode call: converts the value to msgpack-native objects, collecting the
    instances it meets into a table so each is written once (see ``wire``)."""

    __slots__ = (
        "instances",
        "mappers",
        "memo",
        "on_instance",
        "queue",
        "registry",
        "room",
    )

    #: Exact type -> handler; filled in below the class.
    table: ClassVar[dict[type, Handler]]

    def __init__(self, registry: Registry, on_instance: Callable[[object], None] | None) -> None:
        self.registry = registry
        self.on_instance = on_instance
        self.mappers: dict[MapperInfo, int] = {}
        self.memo: dict[int, int] = {}
        self.instances: list[Any] = []
        self.queue: list[tuple[int, Any, MapperInfo, str]] = []
        #: The nesting still allowed below the value being encoded (see ``wire``).
        self.room = wire.MAX_DEPTH

    def enc(self, v: Any, path: str) -> Any:
        t = type(v)
        if t in NATIVE:
            return v
        handler = self.table.get(t)
        if handler is not None:
            return handler(self, v, path)
        return self.enc_other(v, t, path)

    def enc_other(self, v: Any, t: type, path: str) -> Any:
        """Types matched by kind rather than exactly, in this order; else a refusal."""
        state = getattr(v, SA_STATE, None)
        if state is not None and isinstance(state, InstanceState) and not isinstance(v, type):
            return self.ref(v, state, path)
        if isinstance(v, Row):
            return self.enc_row(v, path)
        if isinstance(v, enum.Enum):
            return self.enc_enum(v, path)
        custom = self.registry.custom_by_type.get(t)
        if custom is not None:
            return self.enc_custom(v, custom, path)
        if t.__module__ == "sqlalchemy.orm.collections":
            # A relationship collection returned as is: a plain list or set on a hit.
            if isinstance(v, list):
                return self.enc_list(v, path)
            if isinstance(v, set):
                return self.enc_set(v, path)
        message = next(m for kind, m in _REFUSALS if isinstance(v, kind))
        raise UncacheableValueError(
            message.format(
                path=path, name=t.__name__, qualname=t.__qualname__, module=t.__module__
            ),
            path=path,
        )

    # -- instances --------------------------------------------------------------------
    def ref(self, obj: object, state: InstanceState[Any], path: str) -> Any:
        """An instance inside the value: its index in the payload's instance table."""
        # A 4-byte index, not a nested msgpack int: decoding it needs no second unpack.
        return msgpack.ExtType(wire.INSTANCE, self.index(obj, state, path).to_bytes(4, "big"))

    def index(self, obj: object, state: InstanceState[Any], path: str) -> int:
        idx = self.memo.get(id(obj))
        if idx is None:
            idx = self.memo[id(obj)] = len(self.instances)
            self.instances.append(None)
            info = self.registry.mapper_info(state.mapper)
            self.queue.append((idx, obj, info, path))
            if self.on_instance is not None:
                self.on_instance(obj)
        return idx

    def fill(self) -> None:
        """Snapshot queued instances; relationships queue more (breadth-first, no recursion)."""
        while self.queue:
            idx, obj, info, path = self.queue.pop()
            state: InstanceState[Any] = obj._sa_instance_state
            d = state.dict
            cols = [
                self.enc(d[k], f"{path}.{k}") if k in d else wire.MISSING_EXT for k in info.columns
            ]
            rels: dict[str, Any] = {}
            for key, uselist, _collection_class in info.relationships:
                if key not in d:
                    continue
                value = d[key]
                rpath = f"{path}.{key}"
                if value is None:
                    rels[key] = None
                elif uselist:
                    if not isinstance(value, (list, set)):
                        raise UncacheableValueError(
                            f"{rpath} is a {type(value).__name__} collection; ormcache stores "
                            "list and set collections only",
                            path=rpath,
                        )
                    rels[key] = [
                        self.index(v, v._sa_instance_state, f"{rpath}[{i}]")
                        for i, v in enumerate(value)
                    ]
                else:
                    rels[key] = self.index(value, value._sa_instance_state, rpath)
            identity: list[Any] | None = None
            if state.key is not None:
                identity = [[self.enc(v, path) for v in state.key[1]], state.key[2]]
            mapper_idx = self.mappers.setdefault(info, len(self.mappers))
            self.instances[idx] = [mapper_idx, identity, cols, rels]

    def body(self, value: object) -> bytes:
        """The payload body for ``value`` (see ``wire``)."""
        root = self.enc(value, "value")
        self.fill()
        mappers: list[Any] = [None] * len(self.mappers)
        for info, idx in self.mappers.items():
            mappers[idx] = [info.key, info.fingerprint]
        return pack([mappers, self.instances, root])

    # -- containers -------------------------------------------------------------------
    def enc_list(self, v: list[Any], path: str) -> Any:
        self.room -= 1
        if self.room < 0:
            raise too_deep(path)
        out = [self.enc(x, f"{path}[{i}]") for i, x in enumerate(v)]
        self.room += 1
        return out

    def enc_tuple(self, v: tuple[Any, ...], path: str) -> Any:
        self.room -= wire.EXT_LEVEL
        if self.room < 0:
            raise too_deep(path)
        out = [self.enc(x, f"{path}[{i}]") for i, x in enumerate(v)]
        self.room += wire.EXT_LEVEL
        return msgpack.ExtType(wire.TUPLE, pack(out))

    def enc_row(self, v: Row[Any], path: str) -> Any:
        self.room -= wire.EXT_LEVEL
        if self.room < 0:
            raise too_deep(path)
        fields = list(v._fields)
        values = [self.enc(x, f"{path}.{f}") for f, x in zip(fields, v)]
        self.room += wire.EXT_LEVEL
        return msgpack.ExtType(wire.ROW, pack([fields, values]))

    def enc_enum(self, v: enum.Enum, path: str) -> Any:
        name = self.registry.register_enum(type(v))
        self.room -= wire.EXT_LEVEL
        if self.room < 0:
            raise too_deep(path)
        value = self.enc(v.value, f"{path}.value")
        self.room += wire.EXT_LEVEL
        return msgpack.ExtType(wire.ENUM, pack([name, value]))

    def enc_custom(self, v: Any, custom: CustomType, path: str) -> Any:
        name, encode, _ = custom
        self.room -= wire.EXT_LEVEL
        if self.room < 0:
            raise too_deep(path)
        value = self.enc(encode(v), path)
        self.room += wire.EXT_LEVEL
        return msgpack.ExtType(wire.CUSTOM, pack([name, value]))

    def enc_dict(self, v: dict[Any, Any], path: str) -> Any:
        self.room -= 1
        if self.room < 0:
            raise too_deep(path)
        out = {}
        for k, x in v.items():
            kpath = f"{path}[{k!r}]"
            if k == SA_STATE and isinstance(x, InstanceState):
                raise UncacheableValueError(
                    f"{kpath} is SQLAlchemy internal state; return the object or "
                    "ormcache.as_dict(obj)",
                    path=kpath,
                )
            out[self.enc(k, kpath)] = self.enc(x, kpath)
        self.room += 1
        return out

    def enc_set(self, v: set[Any] | frozenset[Any], path: str) -> Any:
        code = wire.FROZENSET if type(v) is frozenset else wire.SET
        return msgpack.ExtType(code, pack(self.set_items(v, path)))

    def set_items(self, v: set[Any] | frozenset[Any], path: str) -> list[Any]:
        self.room -= wire.EXT_LEVEL
        if self.room < 0:
            raise too_deep(path)
        items = [self.enc(x, f"{path}{{…}}") for x in v]
        self.room += wire.EXT_LEVEL
        return items

    # -- scalars ----------------------------------------------------------------------
    def enc_int(self, v: int, path: str) -> Any:
        if wire.INT_MIN <= v <= wire.INT_MAX:
            return v
        return msgpack.ExtType(
            wire.BIGINT, v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True)
        )

    def enc_datetime(self, v: dt.datetime, path: str) -> Any:
        tz = v.tzinfo
        # Short form: ISO text, for naive times and unnamed fixed offsets (UTC).
        if not v.fold and (
            tz is None
            or (type(tz) is dt.timezone and tz.tzname(None) == _offset_name(v.utcoffset()))
        ):
            return msgpack.ExtType(wire.DATETIME_ISO, v.isoformat().encode())
        return msgpack.ExtType(wire.DATETIME, pack(_clock_parts(v, path)))

    def enc_date(self, v: dt.date, path: str) -> Any:
        return msgpack.ExtType(wire.DATE, v.isoformat().encode())

    def enc_time(self, v: dt.time, path: str) -> Any:
        return msgpack.ExtType(wire.TIME, pack(_clock_parts(v, path)))

    def enc_timedelta(self, v: dt.timedelta, path: str) -> Any:
        return msgpack.ExtType(wire.TIMEDELTA, pack([v.days, v.seconds, v.microseconds]))

    def enc_decimal(self, v: decimal.Decimal, path: str) -> Any:
        return msgpack.ExtType(wire.DECIMAL, str(v).encode())

    def enc_uuid(self, v: uuid.UUID, path: str) -> Any:
        return msgpack.ExtType(wire.UUID, v.bytes)


Encoder.table = {
    int: Encoder.enc_int,
    list: Encoder.enc_list,
    dict: Encoder.enc_dict,
    tuple: Encoder.enc_tuple,
    set: Encoder.enc_set,
    frozenset: Encoder.enc_set,
    dt.datetime: Encoder.enc_datetime,
    dt.date: Encoder.enc_date,
    dt.time: Encoder.enc_time,
    dt.timedelta: Encoder.enc_timedelta,
    decimal.Decimal: Encoder.enc_decimal,
    uuid.UUID: Encoder.enc_uuid,
}


def enc_checking_text(self: Encoder, v: Any, path: str) -> Any:
    """``Encoder.enc``, but refusing text that UTF-8 cannot encode (a lone surrogate)
    where it sits. Run only after packing failed, so the usual encode pays nothing."""
    if type(v) is str:
        try:
            v.encode()
        except UnicodeEncodeError as exc:
            raise UncacheableValueError(
                f"{path} is text that UTF-8 cannot encode ({exc.reason} at {exc.start}); "
                "store valid text, e.g. s.encode('utf-8', 'replace').decode()",
                path=path,
            ) from exc
        return v
    return Encoder.enc(self, v, path)


class _TextCheckingEncoder(Encoder):
    __slots__ = ()
    enc = enc_checking_text


def unpackable(checker: Encoder, value: object, exc: Exception) -> UncacheableValueError:
    """The error for a value msgpack refused (UnicodeEncodeError) or that overflowed the
    call stack (RecursionError): ``checker`` encodes it again, checking every string, to
    name where the bad text sits."""
    if isinstance(exc, RecursionError):
        return UncacheableValueError(
            "value nests too deep for the call stack it is encoded on; return a flatter value",
            path="value",
        )
    try:
        checker.enc(value, "value")
        checker.fill()
    except UncacheableValueError as found:
        return found
    except RecursionError:
        pass  # a deep caller stack again: the message below will do
    # Text the walk does not reach as a value: a Row's field names, an identity token.
    return UncacheableValueError(
        f"value holds text that UTF-8 cannot encode ({exc}); store valid text", path="value"
    )


def encode_body(
    registry: Registry, value: object, on_instance: Callable[[object], None] | None
) -> bytes:
    """The payload body for ``value`` (see ``wire``), or UncacheableValueError."""
    try:
        return Encoder(registry, on_instance).body(value)
    except (UnicodeEncodeError, RecursionError) as exc:
        raise unpackable(_TextCheckingEncoder(registry, None), value, exc) from exc
