"""Hydration: turning a checked payload (``memo.Parsed``) into live objects.

Every call builds fresh instances and fresh containers, so callers never share anything
mutable with each other or with the memo. Instances come out as a database load would
leave them: loaded columns set, unloaded ones expired, relationships set as committed
values, and, with an :class:`Adopter`, identities the session already holds reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy.engine import Row
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.state import InstanceState

from .decode import IMMUTABLE, MISSING_VALUE, SIMPLE, Ref, row_factory
from .memo import Item, Parsed
from .registry import MapperInfo


class Adopter(Protocol):
    """Where decoded instances go (a Session, for the ORM): see ``Codec.decode``."""

    def existing(self, key: tuple[Any, ...]) -> object | None: ...

    def register(self, state: InstanceState[Any], key: tuple[Any, ...], obj: object) -> None: ...


def materialize(parsed: Parsed, copy: bool, into: Adopter | None) -> Any:
    """The payload's value with its instances built. ``copy`` when ``parsed`` is shared
    (memoized): mutable column values are then rebuilt, never handed out."""
    return resolve(parsed.root, build_instances(parsed, copy, into))


def resolve(v: Any, objects: Sequence[Any]) -> Any:
    """Replace placeholders by instances, rebuilding every container on the way (so with
    no instances it is the copy that shares nothing mutable with ``v``).

    Leaves are taken as they are without a call: a cached query's rows are mostly that.
    """
    t = type(v)
    if t is Ref:
        return objects[v.idx]
    if t is list or t is tuple:
        # A plain loop: on Python 3.11 each comprehension costs a function call, and a
        # cached query's rows are many small lists and tuples.
        out = []
        for x in v:
            tx = type(x)
            if tx is Ref:
                out.append(objects[x.idx])
            elif tx in SIMPLE:
                out.append(x)
            else:
                out.append(resolve(x, objects))
        return out if t is list else tuple(out)
    if t is dict:
        return {resolve(k, objects): resolve(x, objects) for k, x in v.items()}
    if t is set or t is frozenset:
        return t(resolve(x, objects) for x in v)
    if isinstance(v, Row):
        return row_factory(tuple(v._fields))([resolve(x, objects) for x in v])
    return v


def build_instances(parsed: Parsed, copy: bool, into: Adopter | None) -> list[Any]:
    """One object per instance of the payload, in payload order.

    Relationships are set only once every object exists (they may point forward or in
    cycles), and objects go to ``into.register`` only at the very end, when nothing can
    fail any more.
    """
    objects: list[Any] = []
    held: list[tuple[Any, Item]] = []
    linked: list[tuple[Any, Item]] = []
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
                if value is MISSING_VALUE:
                    unloaded.append(key)
                elif copy and type(value) not in IMMUTABLE:
                    # Rebuilds every container: shares nothing mutable with the memo.
                    d[key] = resolve(value, ())
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
    for obj, (info, _, _, _, rels) in linked:
        for key, ref in rels.items():
            set_committed_value(obj, key, _related(info, key, ref, objects))
    for existing, (info, _, cols, _, rels) in held:
        # What the session already holds wins; the payload only fills the gaps.
        ex_dict = existing._sa_instance_state.dict
        for key, value in zip(info.columns, cols):
            if value is not MISSING_VALUE and key not in ex_dict:
                set_committed_value(existing, key, resolve(value, ()) if copy else value)
        for key, ref in rels.items():
            if key not in ex_dict:
                set_committed_value(existing, key, _related(info, key, ref, objects))
    if into is not None:
        for state, ident_key, obj in fresh:
            into.register(state, ident_key, obj)
    return objects


def _related(info: MapperInfo, key: str, ref: Any, objects: list[Any]) -> Any:
    """A relationship's value: the objects its indexes name (checked in ``Parsed``)."""
    uselist, collection_class = info.relationship_kinds[key]
    if ref is None:
        return None
    if uselist:
        items = [objects[i] for i in ref]
        return set(items) if collection_class is set else items
    return objects[ref]
