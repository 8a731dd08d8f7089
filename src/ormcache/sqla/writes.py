"""What a write changes: the tags a DML statement or a flush must bump.

Write tags for a table are ``t:<table>`` (any row) and ``a:<table>`` (some partition,
unknown which), so entries tagged by a partition hear about bulk writes too; a flush
knows its rows, and bumps their partitions, old values included. Anything whose targets
cannot be named is a write to the whole namespace.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, inspect
from sqlalchemy.orm import LoaderCallableStatus, Mapper, Session
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.schema import Column

from ormcache.protocol import NAMESPACE_TAG

from .tags import any_partition_tag, column_key, instance_tags, partition_columns, table_tag

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
    """Tags a flush writes: each row's tables and partitions, with its old values.

    A changed or deleted row also bumps the partitions of the values it had before (a
    rotated key's old hash stops answering; a row modified and then deleted in the same
    flush is deleted under its old values). Where an old value of a partition column was
    never loaded (``load_only()``, ``expire(obj, [col])``, a row never loaded at all),
    the writer cannot name the partition it leaves: it bumps every partition of the
    table (``a:<table>``) instead.
    """
    out: set[str] = set()
    for obj in session.new:
        out |= instance_tags(obj, salt=salt)
    changed = [(obj, True) for obj in session.deleted]
    changed += [(obj, False) for obj in session.dirty]
    for obj, is_deleted in changed:
        state: Any = inspect(obj)
        if not is_deleted and not state.modified:
            continue
        out |= instance_tags(obj, salt=salt)
        out |= _old_value_tags(state, obj, salt)
        for rel in state.mapper.relationships:
            secondary = rel.secondary
            if isinstance(secondary, Table) and state.attrs[rel.key].history.has_changes():
                out |= {table_tag(secondary), any_partition_tag(secondary)}
    return out


def _old_value_tags(state: Any, obj: object, salt: bytes | None) -> set[str]:
    old: dict[str, object] = {}
    unknown: set[str] = set()
    committed = state.committed_state
    for prop in state.mapper.column_attrs:
        key = prop.key
        if key not in committed:
            continue
        if committed[key] is LoaderCallableStatus.NO_VALUE:
            unknown.add(key)
            continue
        # Passive history: never load an attribute from inside a flush.
        hist = state.attrs[key].history
        if hist.deleted:
            old[key] = hist.deleted[0]
    out: set[str] = set()
    if old:
        out |= instance_tags(obj, values=old, salt=salt)
    if unknown:
        for table in state.mapper.tables:
            keys = {column_key(state.mapper, col) for col in partition_columns(table)}
            if keys & unknown or None in keys:
                out |= {table_tag(table), any_partition_tag(table)}
    return out
