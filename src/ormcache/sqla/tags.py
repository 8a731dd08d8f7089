"""Tags: the names of what a cached entry was computed from.

* ``*`` — the whole namespace (``clear()``, DML whose tables cannot be known);
* ``t:<table>`` — any row of the table; bumped by every write to it;
* ``a:<table>`` — "some partition of the table, unknown which"; bumped by writes whose
  rows cannot be enumerated (bulk DML), so entries tagged by partitions hear about them;
* ``p:<table>:<column>:<hash>`` — rows whose column equals a value (the value is hashed,
  so no secret appears in a key name).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from sqlalchemy import Column, inspect
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.exc import UnmappedColumnError
from sqlalchemy.sql import sqltypes
from sqlalchemy.sql.expression import TableClause
from sqlalchemy.sql.schema import Table as _Table
from sqlalchemy.types import TypeDecorator, TypeEngine

from ormcache.errors import ConfigurationError

__all__ = [
    "column_key",
    "comparable_type",
    "instance_tags",
    "partition_columns",
    "partition_tag",
    "table_tag",
    "tags_for_target",
]


def table_tag(table: TableClause) -> str:
    return f"t:{table.fullname}"


def any_partition_tag(table: TableClause) -> str:
    return f"a:{table.fullname}"


def comparable_type(type_: Any) -> TypeEngine[Any] | None:
    """The type a column compares as in SQL, or None when the value that reaches the
    database is not the value the application wrote.

    A ``TypeDecorator`` that only relabels a type (no ``process_bind_param``, no
    ``bind_processor``, no ``bind_expression``, no ``coerce_compared_value``) compares as
    its ``impl``. One that transforms bound values (hashing an API key, lower-casing)
    does not: the query's value is transformed on the way in, while the value a writer
    holds is whatever the row loaded as (the stored hash, not the raw key), so the two
    sides cannot be hashed from the same value. Such columns, and types that rewrite
    their bound parameters in SQL, are never partitioned.
    """
    while isinstance(type_, TypeDecorator):
        cls = type(type_)
        if any(getattr(cls, name) is not getattr(TypeDecorator, name) for name in _TRANSFORMS):
            return None
        type_ = type_.impl_instance
    if not isinstance(type_, TypeEngine):
        return None
    if type(type_).bind_expression is not TypeEngine.bind_expression:
        return None
    return type_


_TRANSFORMS = ("process_bind_param", "bind_processor", "bind_expression", "coerce_compared_value")


def _normal(type_: Any, value: object) -> bytes | None:
    """A canonical form for equality partitions, or None when equality is not exact.

    The value must be of the column's own kind: an ``int`` for an integer column, a
    ``str`` for a string column, a UUID (or its text) for a UUID column. Anything else
    is compared by the database after a conversion (``id = '1'``, MariaDB's
    ``id = '1abc'``, a binary string against an int) that the writer's value never went
    through, so reader and writer would hash different spellings of the same row.
    """
    kind = comparable_type(type_)
    if kind is None:
        return None
    if isinstance(kind, sqltypes.Integer):
        return b"i" + str(value).encode() if type(value) is int else None
    if isinstance(kind, sqltypes.Uuid):
        if type(value) is str:
            try:
                value = uuid.UUID(value)
            except ValueError:
                return None
        return b"u" + value.bytes if type(value) is uuid.UUID else None
    if isinstance(kind, sqltypes.String) and type(value) is str and not _caseless(kind):
        # PAD SPACE collations (MySQL/MariaDB, even binary ones) compare 'a' = 'a  ':
        # both spellings must share a tag. Elsewhere this only merges a few partitions.
        return b"s" + value.rstrip(" ").encode("utf-8", "surrogatepass")
    return None


def _caseless(kind: TypeEngine[Any]) -> bool:
    """PostgreSQL ``citext`` compares case-insensitively whatever the collation."""
    return type(kind).__name__.upper() == "CITEXT"


def partition_tag(
    table: TableClause, column: Any, value: object, salt: bytes | None = None
) -> str | None:
    """The tag of rows whose ``column`` equals ``value``, or None when that equality is
    not exact for this column's type (callers then use the table's tag)."""
    norm = _normal(getattr(column, "type", None), value)
    if norm is None:
        return None
    digest = hashlib.blake2b(norm, digest_size=8, key=salt or b"").hexdigest()
    return f"p:{table.fullname}:{column.name}:{digest}"


def partition_columns(table: TableClause) -> tuple[Column[Any], ...]:
    """Columns whose equality partitions are tracked: primary key, unique or indexed."""
    cols: dict[str, Column[Any]] = {}
    for col in table.columns:
        if isinstance(col, Column) and (col.primary_key or col.unique or col.index):
            cols[col.name] = col
    for index in getattr(table, "indexes", ()):
        if len(index.columns) == 1:
            for col in index.columns:
                cols[col.name] = col
    for constraint in getattr(table, "constraints", ()):
        columns = getattr(constraint, "columns", ())
        if len(columns) == 1 and constraint.__class__.__name__ == "UniqueConstraint":
            for col in columns:
                cols[col.name] = col
    return tuple(cols.values())


def column_key(mapper: Any, column: Column[Any]) -> str | None:
    """The attribute a mapper loads ``column`` into, or None if it does not map it."""
    try:
        return str(mapper.get_property_by_column(column).key)
    except UnmappedColumnError:
        return None


def instance_tags(
    obj: object, values: dict[str, object] | None = None, salt: bytes | None = None
) -> set[str]:
    """Tags a write to this row must bump: its tables and its partitions.

    ``values`` overrides the attribute values (used for the old values of a changed row).
    """
    state: Any = inspect(obj)
    mapper: Any = state.mapper
    out: set[str] = set()
    for table in mapper.tables:
        out.add(table_tag(table))
        for col in partition_columns(table):
            key = column_key(mapper, col)
            if key is None:
                out.add(any_partition_tag(table))
                continue
            if values is not None and key in values:
                value = values[key]
            elif key in state.dict:
                value = state.dict[key]
            else:
                out.add(any_partition_tag(table))
                continue
            tag = partition_tag(table, col, value, salt)
            out.add(tag if tag is not None else any_partition_tag(table))
    return out


def tags_for_target(target: object, salt: bytes | None = None) -> set[str]:
    """What ``cache.invalidate(target)`` bumps."""
    if isinstance(target, _Table):
        return {table_tag(target), any_partition_tag(target)}
    if isinstance(target, type):
        mapper: Any = inspect(target, raiseerr=False)
        if isinstance(mapper, Mapper):
            return {
                t for table in mapper.tables for t in (table_tag(table), any_partition_tag(table))
            }
    elif inspect(target, raiseerr=False) is not None and hasattr(inspect(target), "mapper"):
        return instance_tags(target, salt=salt)
    raise ConfigurationError(
        f"cache.invalidate() takes mapped classes, mapped instances or Tables, got {target!r}"
    )
