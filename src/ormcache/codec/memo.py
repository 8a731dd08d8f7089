"""The checked form of a payload with instances, and a bounded memo of recent ones.

A hit on a popular entry decodes the same bytes again and again. The memo keeps their
checked form (:class:`Parsed`), so such a hit skips the msgpack walk, the extension
handlers, the HMAC check and every shape check, and only builds fresh instances
(``hydrate``). The registries only grow, so bytes that passed every check once always
would again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from itertools import chain
from typing import Any

from sqlalchemy.engine import Row

from ormcache.errors import CorruptPayloadError

from .decode import IMMUTABLE, SIMPLE, Ref
from .registry import MapperInfo
from .wire import MAX_DEPTH

#: One instance: (mapper info, identity key or None, column values, all columns loaded
#: and immutable?, relationships).
Item = tuple[MapperInfo, tuple[Any, ...] | None, list[Any], bool, dict[str, Any]]


class Parsed:
    """A checked payload that holds instances, ready to be turned into objects again.

    Everything that could make building fail is checked here, once, so that building a
    hit cannot fail half-way after some instances went into a session.
    """

    __slots__ = ("items", "root")

    def __init__(self, infos: list[MapperInfo], raw: list[Any], root: Any) -> None:
        items: list[Item] = []
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
            plain = IMMUTABLE.issuperset(map(type, cols))
            if not plain:
                for value in cols:
                    # A column holds no instance (n=0); hydrating it recurses.
                    check_refs(value, 0)
            items.append((info, ident_key, cols, plain, rels))
        check_refs(root, n)
        self.items = items
        self.root = root


def check_refs(v: Any, n: int, depth: int = 0) -> None:
    """Every instance reference in the value names one of the payload's ``n`` instances,
    and the value nests no deeper than an encoder writes (hydrating it walks it again on
    every hit, and must not exhaust the stack). ``depth``: the containers around ``v``."""
    t = type(v)
    if t is Ref:
        if not 0 <= v.idx < n:
            raise CorruptPayloadError("reference to no instance of the payload")
        return
    if t is dict:
        children: Iterable[Any] = chain(v, v.values())
    elif t is list or t is tuple or t is set or t is frozenset or isinstance(v, Row):
        children = v
    else:
        return
    if depth >= MAX_DEPTH:
        raise CorruptPayloadError("payload value nests deeper than the format allows")
    for x in children:
        if type(x) not in SIMPLE:
            check_refs(x, n, depth + 1)


class ParseMemo:
    """Payload bytes -> :class:`Parsed`, for small payloads, bounded in bytes.

    Thread-safe. A Parsed is shared by every thread that decodes its bytes: it is never
    changed after it is built, and ``hydrate`` copies whatever is mutable out of it.
    """

    #: Only payloads up to this size are kept, so one large entry cannot evict many.
    MAX_PAYLOAD = 16 * 1024
    #: The total size of the payloads kept.
    MAX_BYTES = 4 * 1024 * 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._table: dict[bytes, Parsed] = {}
        self._bytes = 0
        #: The lookup, bound once (it is on every hit).
        self.get = self._table.get

    def admits(self, data: bytes) -> bool:
        return len(data) <= self.MAX_PAYLOAD

    def remember(self, data: bytes, parsed: Parsed) -> None:
        table = self._table
        with self._lock:
            if data in table:
                return
            # Oldest first (dicts keep insertion order) until the new one fits.
            while table and self._bytes + len(data) > self.MAX_BYTES:
                oldest = next(iter(table))
                del table[oldest]
                self._bytes -= len(oldest)
            table[data] = parsed
            self._bytes += len(data)

    def clear(self) -> None:
        with self._lock:
            self._table.clear()
            self._bytes = 0
