"""What a payload may name: mapped classes, Enum classes and registered custom types.

This is the codec's trust boundary. Decoding builds only classes found here, looked up
by the name the payload gives, and never imports anything: mapped classes come from
SQLAlchemy's own registries, Enum classes from mapped Enum columns or from having been
encoded in this process, and custom types from :meth:`Registry.register_type`.
"""

from __future__ import annotations

import enum
import hashlib
import sys
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Mapper
from sqlalchemy.sql.sqltypes import Enum as SAEnum

#: A custom type's registered name, and its encode and decode functions.
CustomType = tuple[str, Callable[[Any], Any], Callable[[Any], Any]]


def class_key(cls: type) -> str:
    """The name a payload uses for a class (the same for mapped classes and enums)."""
    return f"{cls.__module__}:{cls.__qualname__}"


class MapperInfo:
    """What the codec needs of a mapper, computed once: attribute order and fingerprint.

    The fingerprint covers every column's key, name and type and every relationship, so
    a payload written before a schema change is refused instead of filling the wrong
    attributes.
    """

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
        self.key = class_key(mapper.class_)
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


def _all_mappers() -> list[Mapper[Any]]:
    """Every mapper of every live SQLAlchemy registry (without importing the ORM's
    mapper module if nothing has)."""
    mapperlib = sys.modules.get("sqlalchemy.orm.mapper")
    registries = getattr(mapperlib, "_all_registries", None)
    if registries is None:
        return []
    return [m for registry in registries() for m in registry.mappers]


class Registry:
    """The classes one codec may build. Thread-safe: it is only ever added to, under a
    lock, so a lookup that succeeded once succeeds forever."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mappers: dict[Mapper[Any], MapperInfo] = {}
        self._mappers_by_key: dict[str, MapperInfo] = {}
        self._enums_by_name: dict[str, type[enum.Enum]] = {}
        self._enum_names: dict[type[enum.Enum], str] = {}
        #: Exact type -> custom type (subclasses are not matched: their state may differ).
        self.custom_by_type: dict[type, CustomType] = {}
        #: Registered name -> decode function.
        self.custom_by_name: dict[str, Callable[[Any], Any]] = {}

    def adopt(self, other: Registry) -> None:
        """Take over another registry's custom types and enums (a reconfigured cache must
        not forget what the application registered)."""
        with self._lock:
            self.custom_by_type.update(other.custom_by_type)
            self.custom_by_name.update(other.custom_by_name)
            self._enum_names.update(other._enum_names)
            self._enums_by_name.update(other._enums_by_name)

    def add_type(self, cls: type, custom: CustomType) -> None:
        """See :meth:`ormcache.codec.Codec.register_type`; ``custom`` is ``(name, encode,
        decode)``."""
        name, _, decode = custom
        with self._lock:
            self.custom_by_type[cls] = custom
            self.custom_by_name[name] = decode

    def register_enum(self, cls: type[enum.Enum]) -> str:
        """Allow ``cls`` members in payloads; returns its name in payloads."""
        name = self._enum_names.get(cls)
        if name is None:
            name = class_key(cls)
            with self._lock:
                self._enum_names[cls] = name
                self._enums_by_name[name] = cls
        return name

    def mapper_info(self, mapper: Mapper[Any]) -> MapperInfo:
        """The mapper's info, built on first use; registers its columns' Enum classes, so
        a process that decodes a mapped class also decodes its enums."""
        info = self._mappers.get(mapper)
        if info is None:
            info = MapperInfo(mapper)
            with self._lock:
                self._mappers[mapper] = info
                self._mappers_by_key[info.key] = info
            for prop in mapper.column_attrs:
                for col in prop.columns:
                    enum_class = getattr(col.type, "enum_class", None)
                    if isinstance(col.type, SAEnum) and isinstance(enum_class, type):
                        self.register_enum(enum_class)
        return info

    def find_mapper(self, key: str) -> MapperInfo | None:
        """The mapped class a payload names, or None."""
        info = self._mappers_by_key.get(key)
        if info is not None:
            return info
        # A mapper this process has not encoded yet: look through SQLAlchemy's own
        # registries (never import anything named in the payload).
        for mapper in _all_mappers():
            if class_key(mapper.class_) == key:
                return self.mapper_info(mapper)
        return None

    def find_enum(self, name: str) -> type[enum.Enum] | None:
        """The Enum class a payload names, or None."""
        cls = self._enums_by_name.get(name)
        if cls is None:
            # An Enum used by a mapped column this process has not encoded yet.
            for mapper in _all_mappers():
                self.mapper_info(mapper)
            cls = self._enums_by_name.get(name)
        return cls
