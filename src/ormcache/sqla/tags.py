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
from sqlalchemy.sql.expression import TableClause
from sqlalchemy.sql.schema import Table as _Table

from ormcache.errors import ConfigurationError

__all__ = [
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


def _normal(value: object) -> bytes | None:
    """A canonical form for equality partitions, or None when equality is not exact.

    Only ints, strings and UUIDs qualify: their database equality is their Python
    equality (given a deterministic collation), so reader and writer compute the same tag.
    """
    if type(value) is int:
        return b"i" + str(value).encode()
    if type(value) is str:
        # PAD SPACE collations (MySQL/MariaDB, even binary ones) compare 'a' = 'a  ':
        # both spellings must share a tag. Elsewhere this only merges a few partitions.
        return b"s" + value.rstrip(" ").encode("utf-8", "surrogatepass")
    if type(value) is uuid.UUID:
        return b"u" + value.bytes
    return None


def partition_tag(
    table: TableClause, column: Any, value: object, salt: bytes | None = None
) -> str | None:
    norm = _normal(value)
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
            prop = mapper.get_property_by_column(col)
            key = prop.key
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
