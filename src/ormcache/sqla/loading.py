"""Putting cached instances and rows in front of the caller as a database load would.

A hit is decoded straight into the session that asked (``Codec.decode(into=...)``): an
identity the session already holds is reused, a new one is registered exactly as the
ORM's own row loader registers it. FromCache hits then come back as a ``Result`` with the
metadata the uncached statement's result would have.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy.engine import Result
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.orm import Session
from sqlalchemy.util import immutabledict

__all__ = ["SessionAdopter", "hit_result", "result_payload"]

_LIMIT = 2048


class SessionAdopter:
    """Decodes a hit straight into a session (``Codec.decode(into=...)``): FromCache's
    session, or the session a memoized function merges into. An identity the session
    holds is never built twice, and nothing is walked again afterwards."""

    __slots__ = ("identity_map", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.identity_map = session.identity_map

    def existing(self, key: tuple[Any, ...]) -> object | None:
        return self.identity_map.get(key)

    def register(self, state: Any, key: tuple[Any, ...], obj: object) -> None:
        register(self.session, state, key, obj)


def register(session: Session, state: Any, key: Any, obj: object) -> None:
    """Make a snapshot instance persistent in ``session`` exactly as a row load does.

    This is the ORM loader's own registration (``loading._instance``), a few attribute
    writes instead of ``session.add``'s cascade walk; ``session.add`` is the fallback
    should SQLAlchemy's internals change.
    """
    identity_map: Any = session.identity_map
    try:
        add_unpresent = identity_map._add_unpresent
        hash_key = session.hash_key
    except AttributeError:  # pragma: no cover - future SQLAlchemy
        session.add(obj)
        return
    state.identity_token = key[2]
    state.session_id = hash_key
    add_unpresent(state, key)


# Result metadata per column-key list: immutable, so every hit can share one.
_metadata: dict[tuple[str, ...], SimpleResultMetaData] = {}


def _hit_metadata(keys: list[str]) -> SimpleResultMetaData:
    k = tuple(keys)
    meta = _metadata.get(k)
    if meta is None:
        if len(_metadata) >= _LIMIT:
            _metadata.clear()
        meta = _metadata[k] = SimpleResultMetaData(k)
    return meta


@functools.cache
def _legacy_attributes(single_entity: bool, filtered: bool) -> Any:
    return immutabledict({"is_single_entity": single_entity, "filtered": filtered})


def result_payload(result: Result[Any]) -> tuple[list[Any], Any]:
    """(what FromCache stores, the frozen result to return on this miss)."""
    frozen = result.freeze()
    if frozen._source_supports_scalars:
        rows = [(x,) for x in frozen.data]
    else:
        rows = [tuple(r) for r in frozen.data]
    attrs = result._attributes
    flags = [bool(attrs.get("is_single_entity")), bool(attrs.get("filtered"))]
    # Column keys of Core tables are ``quoted_name`` (a str subclass): store plain str.
    keys = [str(k) for k in list(result.keys())]
    return [keys, rows, flags], frozen


def hit_result(decoded: Any) -> tuple[Result[Any], list[tuple[Any, ...]]]:
    """A decoded FromCache payload as the Result the statement would have returned.

    Raises TypeError for a payload of the wrong shape (the read path counts it as
    corrupt).
    """
    keys, rows, flags = decoded
    if type(rows) is not list or not all(type(r) is tuple for r in rows):
        raise TypeError("cached rows")
    result: Any = IteratorResult(_hit_metadata(keys), iter(rows))
    if flags:
        # What the legacy Query reads to apply scalars() / unique() itself (a new
        # result's attributes are empty: no merge needed).
        result._attributes = _legacy_attributes(bool(flags[0]), bool(flags[1]))
    return result, rows
