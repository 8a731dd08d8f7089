"""What a write changes: the tags a DML statement or a flush must bump.

Write tags for a table are ``t:<table>`` (any row) and ``a:<table>`` (some partition,
unknown which), so entries tagged by a partition hear about bulk writes too; a flush
knows its rows, and bumps their partitions, old values included. Anything whose targets
cannot be named is a write to the whole namespace.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, inspect
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.schema import Column

from ormcache.protocol import NAMESPACE_TAG

from .tags import any_partition_tag, instance_tags, table_tag

__all__ = ["dml_write_tags", "flush_write_tags"]


def dml_write_tags(stmt: Any) -> set[str]:
    """Tags an INSERT/UPDATE/DELETE (Core or ORM-enabled) may write.

    Its target table, every table of a mapped target (joined inheritance), the tables a
    multi-table UPDATE sets columns of (MySQL/MariaDB ``UPDATE a, b SET b.x = …``), and
    the targets of DML nested in it (a data-modifying CTE feeding an INSERT … SELECT).
    Tables only read (``UPDATE … FROM``, ``WHERE … IN (SELECT …)``) are not written.
    ``NAMESPACE_TAG`` when no target can be named.
    """
    tables: set[Table] = set()
    for el in visitors.iterate(stmt):
        if isinstance(el, UpdateBase):
            tables |= _targets(el)
    if not tables:
        return {NAMESPACE_TAG}
    return {tag for t in tables for tag in (table_tag(t), any_partition_tag(t))}


def _targets(stmt: UpdateBase) -> set[Table]:
    tables: set[Table] = set()
    table = getattr(stmt, "table", None)
    if isinstance(table, Table):
        tables.add(table)
    annotations = getattr(table, "_annotations", None) or {}
    mapper = inspect(annotations.get("parententity"), raiseerr=False)
    if isinstance(mapper, Mapper):
        tables.update(t for t in mapper.tables if isinstance(t, Table))
    values: dict[Any, Any] = dict(getattr(stmt, "_values", None) or {})
    values.update(dict(getattr(stmt, "_ordered_values", None) or ()))
    for key in values:
        if isinstance(key, Column) and isinstance(key.table, Table):
            tables.add(key.table)
    return tables


def flush_write_tags(session: Session, salt: bytes | None) -> set[str]:
    out: set[str] = set()
    for obj in session.new:
        out |= instance_tags(obj, salt=salt)
    for obj in session.deleted:
        out |= instance_tags(obj, salt=salt)
    for obj in session.dirty:
        state: Any = inspect(obj)
        if not state.modified:
            continue
        out |= instance_tags(obj, salt=salt)
        old: dict[str, object] = {}
        for prop in state.mapper.column_attrs:
            # Passive history: never load an attribute from inside a flush.
            hist = state.attrs[prop.key].history
            if hist.deleted:
                old[prop.key] = hist.deleted[0]
        if old:
            out |= instance_tags(obj, values=old, salt=salt)
        for rel in state.mapper.relationships:
            secondary = rel.secondary
            if isinstance(secondary, Table) and state.attrs[rel.key].history.has_changes():
                out |= {table_tag(secondary), any_partition_tag(secondary)}
    return out
