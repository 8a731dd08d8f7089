"""The snapshot format: typed, versioned msgpack. No pickle, no imports, no code.

A payload is ``b"OC" + version + flags [+ HMAC-SHA256] + body``. The body is three
msgpack objects in a row:

1. the mappers it uses, each ``[registry key, schema fingerprint]``;
2. the instances, each ``[mapper index, identity, column values, relationships]``, where
   relationships name other instances by index, so shared and cyclic references survive;
3. the value itself, in which an instance is an ``INSTANCE`` extension holding an index.

Decoding builds only what this process has registered: mapped classes found in
SQLAlchemy's registries (looked up by key, never imported), Enum classes and custom types
registered with ``cache.register_type`` (:meth:`Codec.register_type`). Any payload that
fails any check raises :class:`~ormcache.errors.CorruptPayloadError`, which the cache
treats as a miss.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import hashlib
import hmac
import re
import sys
import threading
import uuid
import zoneinfo
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, Protocol, TypeVar

import msgpack
from sqlalchemy import inspect
from sqlalchemy.engine import Row
from sqlalchemy.engine.result import result_tuple
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.sqltypes import Enum as SAEnum

from .errors import CorruptPayloadError, UncacheableValueError

__all__ = ["Codec", "as_dict"]

T = TypeVar("T")

MAGIC = b"OC"
VERSION = 1
FLAG_SIGNED = 1
_HEADER = 4
_DIGEST = 32
_INT64 = (-(2**63), 2**64 - 1)

# Extension type codes (part of the format: never renumber).
MISSING, TUPLE, SET, FROZENSET, BIGINT, DATETIME, DATE, TIME = 0, 1, 2, 3, 4, 5, 6, 7
TIMEDELTA, DECIMAL, UUID, ENUM, ROW, INSTANCE, CUSTOM, IDENTITY = 8, 9, 10, 11, 12, 13, 14, 15
DATETIME_ISO = 16

_MISSING_EXT = msgpack.ExtType(MISSING, b"")
_SIMPLE = frozenset((str, int, float, bool, bytes, type(None)))
_SA_STATE = "_sa_instance_state"


class _Ref:
    """An instance reference met while unpacking, before the instances exist."""

    __slots__ = ("idx",)

    def __init__(self, idx: int) -> None:
        self.idx = idx


def _resolve(v: Any, objects: Sequence[Any]) -> Any:
    """Replace placeholders by instances, rebuilding every container on the way (so with
    no instances it is the copy that shares nothing mutable with ``v``).

    Leaves are taken as they are without a call: a cached query's rows are mostly that.
    """
    t = type(v)
    if t is _Ref:
        return objects[v.idx]
    if t is list or t is tuple:
        # A plain loop: on Python 3.11 each comprehension costs a function call, and a
        # cached query's rows are many small lists and tuples.
        out = []
        for x in v:
            tx = type(x)
            if tx is _Ref:
                out.append(objects[x.idx])
            elif tx in _SIMPLE:
                out.append(x)
            else:
                out.append(_resolve(x, objects))
        return out if t is list else tuple(out)
    if t is dict:
        return {_resolve(k, objects): _resolve(x, objects) for k, x in v.items()}
    if t is set or t is frozenset:
        return t(_resolve(x, objects) for x in v)
    if isinstance(v, Row):
        return _row_factory(tuple(v._fields))([_resolve(x, objects) for x in v])
    return v


class _Missing:
    """An unloaded column inside a decoded instance row."""


_MISSING = _Missing()


_packers = threading.local()


def _pack(obj: object) -> bytes:
    """``msgpack.packb`` on this thread's own Packer: building a Packer costs several
    times what packing a key's arguments does. A Packer empties its buffer after each
    call, failed ones included, and is never shared between threads."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)  # type: ignore[no-any-return]


# A zone key names a file in the tz database: allow only what such names look like.
_ZONE_KEY = re.compile(r"^[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*$")


@lru_cache(maxsize=256)
def _row_factory(fields: tuple[str, ...]) -> Callable[[Any], Row[Any]]:
    return result_tuple(fields)


def _offset_name(offset: dt.timedelta | None) -> str | None:
    """The default name of a whole-minute offset, or None (which never matches a name)."""
    if offset is None or offset.microseconds or offset.seconds % 60:
        return None
    return dt.timezone(offset).tzname(None)


def _bigint_bytes(value: int) -> bytes:
    length = (value.bit_length() + 8) // 8
    return value.to_bytes(length, "big", signed=True)


class _MapperInfo:
    """What the codec needs of a mapper, computed once: attribute order and fingerprint."""

    __slots__ = (
        "columns",
        "fingerprint",
        "identity_class",
        "key",
        "mapper",
        "new_instance",
        "pk_width",
        "relationship_kinds",
        "relationships",
    )

    def __init__(self, mapper: Mapper[Any]) -> None:
        self.mapper = mapper
        cls = mapper.class_
        self.key = f"{cls.__module__}:{cls.__qualname__}"
        self.columns: tuple[str, ...] = tuple(p.key for p in mapper.column_attrs)
        self.identity_class: type = mapper._identity_class
        self.pk_width = len(mapper.primary_key)
        self.relationships: tuple[tuple[str, bool, Any], ...] = tuple(
            (r.key, bool(r.uselist), r.collection_class) for r in mapper.relationships
        )
        self.relationship_kinds = {k: (u, c) for k, u, c in self.relationships}
        self.new_instance = mapper.class_manager.new_instance
        parts: list[str] = [self.key]
        for prop in mapper.column_attrs:
            for col in prop.columns:
                parts.append(f"{prop.key}:{getattr(col, 'name', '')}:{type(col.type).__name__}")
                parts.append(repr(col.type))
        parts.extend(f"rel:{k}:{u}" for k, u, _ in self.relationships)
        self.fingerprint = hashlib.blake2b("|".join(parts).encode(), digest_size=8).digest()


class _Encoder:
    """One encode call: converts the value to msgpack-native objects, collecting instances."""

    __slots__ = ("canonical", "codec", "instances", "mappers", "memo", "on_instance", "queue")

    def __init__(
        self, codec: Codec, on_instance: Callable[[object], None] | None, canonical: bool
    ) -> None:
        self.codec = codec
        self.on_instance = on_instance
        self.canonical = canonical
        self.mappers: dict[Mapper[Any], int] = {}
        self.memo: dict[int, int] = {}
        self.instances: list[Any] = []
        self.queue: list[tuple[int, Any, _MapperInfo, str]] = []

    def mapper_index(self, info: _MapperInfo) -> int:
        idx = self.mappers.get(info.mapper)
        if idx is None:
            idx = self.mappers[info.mapper] = len(self.mappers)
        return idx

    def instance(self, obj: object, state: InstanceState[Any], path: str) -> Any:
        if self.canonical:
            if state.key is None:
                raise UncacheableValueError(
                    f"{path} is a {type(obj).__name__} without an identity (not yet "
                    "flushed); pass its primary key instead",
                    path=path,
                )
            info = self.codec.mapper_info(state.mapper)
            return msgpack.ExtType(
                IDENTITY, _pack([info.key, [self.enc(v, path) for v in state.key[1]]])
            )
        idx = self.memo.get(id(obj))
        if idx is None:
            idx = self.memo[id(obj)] = len(self.instances)
            self.instances.append(None)
            info = self.codec.mapper_info(state.mapper)
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
            cols = [self.enc(d[k], f"{path}.{k}") if k in d else _MISSING_EXT for k in info.columns]
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
                        self.instance(v, v._sa_instance_state, f"{rpath}[{i}]")
                        for i, v in enumerate(value)
                    ]
                else:
                    rels[key] = self.instance(value, value._sa_instance_state, rpath)
            identity: list[Any] | None = None
            if state.key is not None:
                identity = [[self.enc(v, path) for v in state.key[1]], state.key[2]]
            self.instances[idx] = [self.mapper_index(info), identity, cols, rels]

    def enc(self, v: Any, path: str) -> Any:
        t = type(v)
        if t is str or t is float or t is bool or v is None or t is bytes:
            return v
        if t is int:
            if _INT64[0] <= v <= _INT64[1]:
                return v
            return msgpack.ExtType(BIGINT, _bigint_bytes(v))
        if t is list:
            return [self.enc(x, f"{path}[{i}]") for i, x in enumerate(v)]
        if t is dict:
            return self.enc_dict(v, path)
        if t is tuple:
            items = [self.enc(x, f"{path}[{i}]") for i, x in enumerate(v)]
            return msgpack.ExtType(TUPLE, _pack(items))
        state = getattr(v, _SA_STATE, None)
        if state is not None and isinstance(state, InstanceState) and not isinstance(v, type):
            ref = self.instance(v, state, path)
            # A 4-byte index, not a nested msgpack int: decoding it needs no second unpack.
            return ref if self.canonical else msgpack.ExtType(INSTANCE, ref.to_bytes(4, "big"))
        return self.enc_other(v, t, path)

    def enc_dict(self, v: dict[Any, Any], path: str) -> Any:
        out = {}
        for k, x in v.items():
            kpath = f"{path}[{k!r}]"
            if k == _SA_STATE and isinstance(x, InstanceState):
                raise UncacheableValueError(
                    f"{kpath} is SQLAlchemy internal state; return the object or "
                    "ormcache.as_dict(obj)",
                    path=kpath,
                )
            out[self.enc(k, kpath)] = self.enc(x, kpath)
        if self.canonical:
            return msgpack.ExtType(SET, _pack(sorted(_pack([k, x]) for k, x in out.items())))
        return out

    def enc_other(self, v: Any, t: type, path: str) -> Any:
        if t is dt.datetime:
            tz = v.tzinfo
            # Fast form: ISO text, for naive times and unnamed fixed offsets (UTC).
            if not v.fold and (
                tz is None
                or (type(tz) is dt.timezone and tz.tzname(None) == _offset_name(v.utcoffset()))
            ):
                return msgpack.ExtType(DATETIME_ISO, v.isoformat().encode())
            return msgpack.ExtType(DATETIME, _pack(self.clock_parts(v, v.isoformat(), path)))
        if t is dt.date:
            return msgpack.ExtType(DATE, v.isoformat().encode())
        if t is dt.time:
            return msgpack.ExtType(TIME, _pack(self.clock_parts(v, v.isoformat(), path)))
        if t is dt.timedelta:
            return msgpack.ExtType(TIMEDELTA, _pack([v.days, v.seconds, v.microseconds]))
        if t is decimal.Decimal:
            return msgpack.ExtType(DECIMAL, str(v).encode())
        if t is uuid.UUID:
            return msgpack.ExtType(UUID, v.bytes)
        if t is set or t is frozenset:
            items = [self.enc(x, f"{path}{{…}}") for x in v]
            packed = sorted(_pack(x) for x in items) if self.canonical else items
            return msgpack.ExtType(SET if t is set else FROZENSET, _pack(packed))
        if isinstance(v, Row):
            fields = list(v._fields)
            values = [self.enc(x, f"{path}.{f}") for f, x in zip(fields, v)]
            return msgpack.ExtType(ROW, _pack([fields, values]))
        if isinstance(v, enum.Enum):
            name = self.codec.register_enum(t)
            return msgpack.ExtType(ENUM, _pack([name, self.enc(v.value, f"{path}.value")]))
        custom = self.codec._custom_by_type.get(t)
        if custom is not None:
            name, encode, _ = custom
            return msgpack.ExtType(CUSTOM, _pack([name, self.enc(encode(v), path)]))
        if t.__module__ == "sqlalchemy.orm.collections":
            # A relationship collection returned as is: a plain list or set on a hit.
            if isinstance(v, list):
                return [self.enc(x, f"{path}[{i}]") for i, x in enumerate(v)]
            if isinstance(v, set):
                return msgpack.ExtType(SET, _pack([self.enc(x, f"{path}{{…}}") for x in v]))
        if isinstance(v, InstanceState):
            raise UncacheableValueError(
                f"{path} is SQLAlchemy internal state; return the object or ormcache.as_dict(obj)",
                path=path,
            )
        if isinstance(v, dict):
            raise UncacheableValueError(
                f"{path} is a {t.__name__}, which would come back as a plain dict; "
                "convert it with dict(...) first",
                path=path,
            )
        if isinstance(v, (bytearray, memoryview)):
            raise UncacheableValueError(
                f"{path} is a {t.__name__}; return bytes(...) instead", path=path
            )
        raise UncacheableValueError(
            f"{path} is a {t.__module__}.{t.__qualname__}, which ormcache cannot store; "
            "convert it to a supported type or register it with cache.register_type()",
            path=path,
        )

    def clock_parts(self, v: dt.datetime | dt.time, iso: str, path: str) -> list[Any]:
        tz = v.tzinfo
        if tz is None:
            return [iso, v.fold]
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


# Values that may be shared between decoded copies: nobody can change them in place.
_IMMUTABLE = frozenset(
    (
        str,
        int,
        float,
        bool,
        bytes,
        type(None),
        dt.datetime,
        dt.date,
        dt.time,
        dt.timedelta,
        decimal.Decimal,
        uuid.UUID,
    )
)


# (mapper info, identity key or None, column values, all plain and loaded?, relationships)
_Item = tuple[_MapperInfo, tuple[Any, ...] | None, list[Any], bool, dict[str, Any]]


class _Parsed:
    """A checked payload that holds instances, ready to be turned into objects again.

    Kept per payload (see ``Codec._parsed``): a hit on the same entry then skips the
    msgpack walk, the extension hooks and the HMAC check, and only builds fresh instances.
    """

    __slots__ = ("items", "root")

    def __init__(self, infos: list[_MapperInfo], raw: list[Any], root: Any) -> None:
        """Check every instance against its mapper once, here, not on every hit."""
        items: list[_Item] = []
        keys = set()
        n = len(raw)
        for entry in raw:
            mapper_idx, identity, cols, rels = entry
            if type(mapper_idx) is not int or not 0 <= mapper_idx < len(infos):
                raise CorruptPayloadError("instance names no mapper of the payload")
            info = infos[mapper_idx]
            if type(cols) is not list or len(cols) != len(info.columns) or type(rels) is not dict:
                raise CorruptPayloadError("instance does not match its mapper")
            ident_key = None
            if identity is not None:
                pk, token = identity
                if type(pk) is not list or len(pk) != info.pk_width:
                    raise CorruptPayloadError("identity does not match its mapper")
                ident_key = (info.identity_class, tuple(pk), token)
                if ident_key in keys:
                    raise CorruptPayloadError("one identity appears twice in the payload")
                keys.add(ident_key)
            for key, ref in rels.items():
                kind = info.relationship_kinds.get(key)
                if kind is None:
                    raise CorruptPayloadError("unknown relationship in payload")
                refs = [] if ref is None else ref if kind[0] else [ref]
                if type(refs) is not list or not all(type(i) is int and 0 <= i < n for i in refs):
                    raise CorruptPayloadError("relationship names no instance of the payload")
            plain = _IMMUTABLE.issuperset(map(type, cols))
            items.append((info, ident_key, cols, plain, rels))
        _check_refs(root, n)
        self.items = items
        self.root = root


def _check_refs(v: Any, n: int) -> None:
    """Every instance reference in the value names an instance of the payload (checked
    once, so building a hit cannot fail after instances went into a session)."""
    t = type(v)
    if t is _Ref:
        if not 0 <= v.idx < n:
            raise CorruptPayloadError("reference to no instance of the payload")
    elif t is list or t is tuple or t is set or t is frozenset:
        for x in v:
            if type(x) not in _SIMPLE:
                _check_refs(x, n)
    elif t is dict:
        for k, x in v.items():
            _check_refs(k, n)
            _check_refs(x, n)
    elif isinstance(v, Row):
        for x in v:
            _check_refs(x, n)


# Bounds on the parsed-payload memo: small entries only, a few MiB in all.
_PARSED_MAX_PAYLOAD = 16 * 1024
_PARSED_MAX_BYTES = 4 * 1024 * 1024


class Adopter(Protocol):
    """Where decoded instances go (a Session, for the ORM): see ``Codec.decode``."""

    def existing(self, key: tuple[Any, ...]) -> object | None: ...

    def register(self, state: InstanceState[Any], key: tuple[Any, ...], obj: object) -> None: ...


class _Decoder:
    __slots__ = ("codec", "custom", "refs")

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.refs = 0
        self.custom = False

    def unpack(self, data: bytes) -> Any:
        return msgpack.unpackb(
            data, ext_hook=self.ext, raw=False, strict_map_key=False, use_list=True
        )

    def ext(self, code: int, data: bytes) -> Any:
        if code == INSTANCE:
            if len(data) != 4:
                raise ValueError("instance reference")
            self.refs += 1
            return _Ref(int.from_bytes(data, "big"))
        if code == DATETIME_ISO:
            value = dt.datetime.fromisoformat(data.decode("ascii"))
            tz = value.tzinfo
            if tz is not None and type(tz) is not dt.timezone:
                raise ValueError("datetime zone")
            return value
        if code == TUPLE:
            items = self.unpack(data)
            if type(items) is not list:
                raise ValueError("tuple")
            return tuple(items)
        if code in (SET, FROZENSET):
            items = self.unpack(data)
            if type(items) is not list:
                raise ValueError("set")
            return set(items) if code == SET else frozenset(items)
        if code == DATETIME:
            return self.clock(self.unpack(data), dt.datetime.fromisoformat)
        if code == DATE:
            return dt.date.fromisoformat(data.decode("ascii"))
        if code == TIME:
            return self.clock(self.unpack(data), dt.time.fromisoformat)
        if code == TIMEDELTA:
            days, seconds, micros = self.unpack(data)
            return dt.timedelta(days=days, seconds=seconds, microseconds=micros)
        if code == DECIMAL:
            return decimal.Decimal(data.decode("ascii"))
        if code == UUID:
            return uuid.UUID(bytes=data)
        if code == BIGINT:
            return int.from_bytes(data, "big", signed=True)
        if code == ROW:
            fields, values = self.unpack(data)
            if not all(type(f) is str for f in fields) or len(fields) != len(values):
                raise ValueError("row")
            return _row_factory(tuple(fields))(values)
        if code == ENUM:
            name, value = self.unpack(data)
            cls = self.codec._enums_by_name.get(name) or self.codec._lookup_enum(name)
            if cls is None:
                raise ValueError("unknown enum")
            return cls(value)
        if code == CUSTOM:
            name, value = self.unpack(data)
            custom = self.codec._custom_by_name.get(name)
            if custom is None:
                raise ValueError("unknown custom type")
            # Custom values may be mutable in ways a rebuild cannot see: never memoized.
            self.custom = True
            return custom(value)
        if code == MISSING:
            return _MISSING
        raise ValueError(f"unknown extension {code}")

    @staticmethod
    def clock(parts: list[Any], parse: Callable[[str], Any]) -> Any:
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


class Codec:
    """Encodes values to payloads and back; one per ``Cache``.

    Thread-safe: registries are only ever added to, under a lock.
    """

    def __init__(self, *, secret: bytes | None = None) -> None:
        self._secret = secret
        #: Keys the hashes of values in key names and tags when a secret is configured,
        #: so a Redis reader cannot confirm guessed values by hashing them.
        self.hash_salt: bytes | None = (
            None if secret is None else hashlib.blake2b(b"ormcache-keys" + secret).digest()[:32]
        )
        self._lock = threading.Lock()
        self._mappers: dict[Mapper[Any], _MapperInfo] = {}
        self._mappers_by_key: dict[str, _MapperInfo] = {}
        self._enums_by_name: dict[str, type[enum.Enum]] = {}
        self._enum_names: dict[type[enum.Enum], str] = {}
        self._custom_by_type: dict[
            type, tuple[str, Callable[[Any], Any], Callable[[Any], Any]]
        ] = {}
        self._custom_by_name: dict[str, Callable[[Any], Any]] = {}
        # payload bytes -> its parsed form (only payloads with instances, see _Parsed)
        self._parsed: dict[bytes, _Parsed] = {}
        self._parsed_bytes = 0

    # -- registries -------------------------------------------------------------------
    def adopt_registrations(self, other: Codec) -> None:
        """Take over another codec's custom types and enums (a reconfigured cache must not
        forget what the application registered)."""
        with self._lock:
            self._custom_by_type.update(other._custom_by_type)
            self._custom_by_name.update(other._custom_by_name)
            self._enum_names.update(other._enum_names)
            self._enums_by_name.update(other._enums_by_name)

    def register_type(
        self,
        cls: type[T],
        *,
        name: str,
        encode: Callable[[T], Any],
        decode: Callable[[Any], T],
    ) -> None:
        """The one hook for custom types: ``encode`` must return a storable value and
        ``decode`` must rebuild the object from it. ``name`` goes into payloads, so keep
        it stable across releases."""
        with self._lock:
            self._custom_by_type[cls] = (name, encode, decode)
            self._custom_by_name[name] = decode

    def register_enum(self, cls: type[enum.Enum]) -> str:
        """Allow ``cls`` members in payloads (done automatically for mapped Enum columns
        and for enums met while encoding); returns its registry name."""
        name = self._enum_names.get(cls)
        if name is None:
            name = f"{cls.__module__}:{cls.__qualname__}"
            with self._lock:
                self._enum_names[cls] = name
                self._enums_by_name[name] = cls
        return name

    def mapper_info(self, mapper: Mapper[Any]) -> _MapperInfo:
        info = self._mappers.get(mapper)
        if info is None:
            info = _MapperInfo(mapper)
            with self._lock:
                self._mappers[mapper] = info
                self._mappers_by_key[info.key] = info
            for prop in mapper.column_attrs:
                for col in prop.columns:
                    enum_class = getattr(col.type, "enum_class", None)
                    if isinstance(col.type, SAEnum) and isinstance(enum_class, type):
                        self.register_enum(enum_class)
        return info

    def _all_mappers(self) -> list[Mapper[Any]]:
        mapperlib = sys.modules.get("sqlalchemy.orm.mapper")
        registries = getattr(mapperlib, "_all_registries", None)
        if registries is None:
            return []
        return [m for registry in registries() for m in registry.mappers]

    def _lookup_enum(self, name: str) -> type[enum.Enum] | None:
        """An Enum used by a mapped column this process has not encoded yet."""
        for mapper in self._all_mappers():
            self.mapper_info(mapper)
        return self._enums_by_name.get(name)

    def _lookup_mapper(self, key: str) -> _MapperInfo | None:
        info = self._mappers_by_key.get(key)
        if info is not None:
            return info
        # A mapper this process has not encoded yet: look through SQLAlchemy's own
        # registries (never import anything named in the payload).
        for mapper in self._all_mappers():
            cls = mapper.class_
            if f"{cls.__module__}:{cls.__qualname__}" == key:
                return self.mapper_info(mapper)
        return None

    # -- encode -----------------------------------------------------------------------
    def encode(
        self, value: object, *, on_instance: Callable[[object], None] | None = None
    ) -> bytes:
        """The payload for ``value``; raises UncacheableValueError naming the bad part."""
        enc = _Encoder(self, on_instance, canonical=False)
        root = enc.enc(value, "value")
        enc.fill()
        mappers = [None] * len(enc.mappers)
        for mapper, idx in enc.mappers.items():
            info = self._mappers[mapper]
            mappers[idx] = [info.key, info.fingerprint]  # type: ignore[call-overload]
        body = _pack([mappers, enc.instances, root])
        if self._secret is None:
            return MAGIC + bytes((VERSION, 0)) + body
        digest = hmac.digest(self._secret, body, "sha256")
        return MAGIC + bytes((VERSION, FLAG_SIGNED)) + digest + body

    def canonical(self, value: object) -> bytes:
        """Deterministic bytes for hashing arguments into keys (not decodable)."""
        if type(value) is tuple and all(
            type(x) in _SIMPLE and (type(x) is not int or _INT64[0] <= x <= _INT64[1])
            for x in value
        ):
            # Scalars only (the usual memoize arguments): msgpack already tells str,
            # bytes, int, float, bool and None apart.
            return b"s" + _pack(value)
        enc = _Encoder(self, None, canonical=True)
        return b"c" + _pack(enc.enc(value, "value"))

    # -- decode -----------------------------------------------------------------------
    def decode(self, data: bytes, *, into: Adopter | None = None) -> object:
        """The value in a payload; CorruptPayloadError for anything not written by us.

        With ``into``, instances whose identity ``into`` already holds are not built: the
        held object stands in, and only its unloaded attributes are filled from the
        payload (a database load's rule). The others are built and handed to
        ``into.register``.
        """
        try:
            return self._decode(data, into)
        except CorruptPayloadError:
            raise
        except Exception as exc:
            raise CorruptPayloadError(
                f"payload could not be decoded ({type(exc).__name__})"
            ) from exc

    def _decode(self, data: bytes, into: Adopter | None) -> object:
        if type(data) is not bytes:
            data = bytes(data)
        parsed = self._parsed.get(data)
        if parsed is not None:
            # These very bytes passed every check before (the registries only grow).
            return self._materialize(parsed, True, into)
        if len(data) < _HEADER or data[:2] != MAGIC:
            raise CorruptPayloadError("not an ormcache payload (bad magic)")
        if data[2] != VERSION:
            raise CorruptPayloadError(f"payload version {data[2]} is not {VERSION}")
        flags = data[3]
        if flags & ~FLAG_SIGNED:
            raise CorruptPayloadError("unknown payload flags")
        signed = bool(flags & FLAG_SIGNED)
        if signed != (self._secret is not None):
            raise CorruptPayloadError(
                "payload signature mode differs from this cache's (secret set on one side only)"
            )
        body = data[_HEADER:]
        if signed:
            assert self._secret is not None
            digest, body = body[:_DIGEST], body[_DIGEST:]
            if len(digest) != _DIGEST or not hmac.compare_digest(
                digest, hmac.digest(self._secret, body, "sha256")
            ):
                raise CorruptPayloadError("payload signature does not match")
        dec = _Decoder(self)
        parts = msgpack.unpackb(
            body,
            ext_hook=dec.ext,
            raw=False,
            strict_map_key=False,
            use_list=True,
        )
        if type(parts) is not list or len(parts) != 3:
            raise CorruptPayloadError("malformed payload body")
        mappers_raw, instances_raw, root = parts
        if type(mappers_raw) is not list or type(instances_raw) is not list:
            raise CorruptPayloadError("malformed payload header")
        if not instances_raw:
            if dec.refs:
                raise CorruptPayloadError("instance reference without instances")
            return root
        infos = []
        for entry in mappers_raw:
            key, fingerprint = entry
            info = self._lookup_mapper(key)
            if info is None:
                raise CorruptPayloadError("payload names a mapper this process does not know")
            if info.fingerprint != fingerprint:
                raise CorruptPayloadError("schema changed since the payload was written")
            infos.append(info)
        parsed = _Parsed(infos, instances_raw, root)
        memo = not dec.custom and len(data) <= _PARSED_MAX_PAYLOAD
        # A memoized parse is shared: even this first copy must not hand out its lists.
        value = self._materialize(parsed, memo, into)
        if memo:
            self._remember(data, parsed)
        return value

    def _remember(self, data: bytes, parsed: _Parsed) -> None:
        table = self._parsed
        with self._lock:
            if data in table:
                return
            # Oldest first (dicts keep insertion order) until the new one fits.
            while table and self._parsed_bytes + len(data) > _PARSED_MAX_BYTES:
                oldest = next(iter(table))
                del table[oldest]
                self._parsed_bytes -= len(oldest)
            table[data] = parsed
            self._parsed_bytes += len(data)

    def _materialize(self, parsed: _Parsed, copy: bool, into: Adopter | None) -> Any:
        objects = self._build_instances(parsed, copy, into)
        return _resolve(parsed.root, objects)

    def _build_instances(self, parsed: _Parsed, copy: bool, into: Adopter | None) -> list[Any]:
        objects: list[Any] = []
        held: list[tuple[Any, _Item]] = []
        linked: list[tuple[Any, _Item]] = []
        fresh: list[tuple[Any, tuple[Any, ...], Any]] = []
        for item in parsed.items:
            info, ident_key, cols, plain, _ = item
            if into is not None and ident_key is not None:
                existing = into.existing(ident_key)
                if existing is not None:
                    objects.append(existing)
                    held.append((existing, item))
                    continue
            obj = info.new_instance()
            state: InstanceState[Any] = obj._sa_instance_state
            d = obj.__dict__  # where SQLAlchemy keeps loaded state (orm.base.instance_dict)
            if plain:
                # Every column loaded, none mutable: the usual row, one C-level update.
                d.update(zip(info.columns, cols))
            else:
                unloaded = []
                for key, value in zip(info.columns, cols):
                    if value is _MISSING:
                        unloaded.append(key)
                    elif copy and type(value) not in _IMMUTABLE:
                        # Rebuilds every container: shares nothing mutable with the memo.
                        d[key] = _resolve(value, ())
                    else:
                        d[key] = value
                if unloaded:
                    # As on an ORM-loaded object: reading them loads them (in a session)
                    # or raises DetachedInstanceError (detached), never gives None.
                    state.expired_attributes.update(unloaded)
            if ident_key is not None:
                state.key = ident_key
                if into is not None:
                    fresh.append((state, ident_key, obj))
            objects.append(obj)
            if item[4]:
                linked.append((obj, item))
        # Relationships once every object exists: they may point forward or in cycles.
        for obj, (info, _, _, _, rels) in linked:
            for key, ref in rels.items():
                set_committed_value(obj, key, self._related(info, key, ref, objects))
        for existing, (info, _, cols, _, rels) in held:
            # What the session already holds wins; the payload only fills the gaps.
            ex_dict = existing._sa_instance_state.dict
            for key, value in zip(info.columns, cols):
                if value is not _MISSING and key not in ex_dict:
                    set_committed_value(existing, key, _resolve(value, ()) if copy else value)
            for key, ref in rels.items():
                if key not in ex_dict:
                    set_committed_value(existing, key, self._related(info, key, ref, objects))
        if into is not None:
            for state, ident_key, obj in fresh:
                into.register(state, ident_key, obj)
        return objects

    @staticmethod
    def _related(info: _MapperInfo, key: str, ref: Any, objects: list[Any]) -> Any:
        uselist, collection_class = info.relationship_kinds[key]  # checked in _Parsed
        if ref is None:
            return None
        if uselist:
            items = [objects[i] for i in ref]
            return set(items) if collection_class is set else items
        return objects[ref]


def as_dict(obj: object) -> dict[str, Any]:
    """The mapped instance's column attributes as a plain dict, ready to cache.

    Use it instead of ``obj.__dict__``, which carries ``_sa_instance_state`` (the seed's
    outage). Loaded attributes are read as they are; unloaded non-deferred ones are read
    normally (which may refresh an expired object); unloaded deferred ones are skipped.
    """
    state: Any = inspect(obj, raiseerr=False)
    if state is None or not hasattr(state, "mapper"):
        raise UncacheableValueError(
            f"as_dict() takes a mapped instance, got a {type(obj).__name__}", path="value"
        )
    out: dict[str, Any] = {}
    loaded = state.dict
    for prop in state.mapper.column_attrs:
        if prop.key in loaded:
            out[prop.key] = loaded[prop.key]
        elif not prop.deferred:
            out[prop.key] = getattr(obj, prop.key)
    return out
