"""The canonical form: deterministic bytes for hashing arguments into key names.

Equal values give equal bytes whatever their order (dicts and sets are sorted), values of
different types give different bytes (1, 1.0 and True differ), and a mapped instance
stands for its identity. Never decoded; see the canonical form in ``wire``.
"""

from __future__ import annotations

from typing import Any

import msgpack
from sqlalchemy.orm.state import InstanceState

from ormcache.errors import UncacheableValueError

from . import wire
from .encode import NATIVE, Encoder, enc_checking_text, unpackable
from .registry import Registry
from .wire import IDENTITY, INT_MAX, INT_MIN, SET, pack

#: What the short form takes as it is.
SCALARS = NATIVE | {int}


class CanonicalEncoder(Encoder):
    """The encoder's walk, with sorted dicts and sets and instances by identity."""

    __slots__ = ()

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry, None)
        # The arguments' own tuple is not part of the caller's nesting.
        self.room += wire.EXT_LEVEL

    def ref(self, obj: object, state: InstanceState[Any], path: str) -> Any:
        if state.key is None:
            raise UncacheableValueError(
                f"{path} is a {type(obj).__name__} without an identity (not yet "
                "flushed); pass its primary key instead",
                path=path,
            )
        info = self.registry.mapper_info(state.mapper)
        return msgpack.ExtType(
            IDENTITY, pack([info.key, [self.enc(v, path) for v in state.key[1]]])
        )

    def enc_dict(self, v: dict[Any, Any], path: str) -> Any:
        out = super().enc_dict(v, path)
        return msgpack.ExtType(SET, pack(sorted(pack([k, x]) for k, x in out.items())))

    def set_items(self, v: set[Any] | frozenset[Any], path: str) -> list[Any]:
        return sorted(pack(x) for x in super().set_items(v, path))


CanonicalEncoder.table = {**Encoder.table, dict: CanonicalEncoder.enc_dict}


class _TextCheckingCanonicalEncoder(CanonicalEncoder):
    __slots__ = ()
    enc = enc_checking_text


def encode_canonical(registry: Registry, value: object) -> bytes:
    """The canonical form of ``value``, or UncacheableValueError naming the bad part."""
    try:
        if type(value) is tuple and all(
            type(x) in SCALARS and (type(x) is not int or INT_MIN <= x <= INT_MAX) for x in value
        ):
            # Scalars only (the usual memoize arguments): msgpack already tells str,
            # bytes, int, float, bool and None apart.
            return b"s" + pack(value)
        return b"c" + pack(CanonicalEncoder(registry).enc(value, "value"))
    except (UnicodeEncodeError, RecursionError) as exc:
        raise unpackable(_TextCheckingCanonicalEncoder(registry), value, exc) from exc
