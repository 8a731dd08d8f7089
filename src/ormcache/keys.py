"""Cache key names: readable function prefixes, hashed argument values.

Argument values are hashed (BLAKE2b, 128 bits) into the key, never spelled out, so an API
key, an e-mail address or a token passed to a memoized function cannot leak through
``KEYS *``, a slow log or a monitoring dashboard.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Collection
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, scoped_session

from .codec import Codec
from .errors import UncacheableValueError

__all__ = ["ArgumentKeyer", "hash_bytes"]

# Arguments that say *where* to read, not *what*: they never change the result's
# identity, and they have no stable value to hash.
_SESSION_TYPES: tuple[type, ...] = (Session, scoped_session, Connection)
try:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session

    _SESSION_TYPES += (AsyncSession, async_scoped_session, AsyncConnection)
except ImportError:  # pragma: no cover - depends on the SQLAlchemy build
    pass
_SCALARS = frozenset((str, int, float, bool, bytes, type(None)))


# One keyed BLAKE2b state per salt, copied per use: a copy is half the cost of setting
# one up (and keys and tags are hashed on every lookup).
_hashers: dict[bytes | None, Any] = {}


def hash_bytes(data: bytes, salt: bytes | None = None) -> str:
    base = _hashers.get(salt)
    if base is None:
        base = _hashers[salt] = hashlib.blake2b(digest_size=16, key=salt or b"")
    h = base.copy()
    h.update(data)
    return h.hexdigest()


class ArgumentKeyer:
    """Turns a call's arguments into a key, treating ``f(1)`` and ``f(x=1)`` alike.

    A class argument (a classmethod's ``cls``) is keyed by its module and qualified name,
    so each subclass has entries of its own. A method's ``self`` is an argument like any
    other: an ORM instance is keyed by its identity, and other objects cannot be keyed
    unless listed in ``ignore=("self",)`` (the error says so).

    The common case (all arguments positional, none defaulted) skips
    ``Signature.bind``, which alone would cost more than a memory-backend hit.
    """

    __slots__ = (
        "_codec",
        "_first",
        "_ignore",
        "_memo",
        "_positional",
        "_prefix",
        "_signature",
        "_skip_positions",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        prefix: str,
        codec: Codec,
        ignore: Collection[str] = (),
    ) -> None:
        self._prefix = prefix
        self._codec = codec
        self._signature = inspect.signature(fn)
        params = list(self._signature.parameters.values())
        unknown = set(ignore) - {p.name for p in params}
        if unknown:
            from .errors import ConfigurationError

            raise ConfigurationError(
                f"memoize(ignore=...) names {sorted(unknown)}, which are not parameters of "
                f"{fn.__qualname__}; use the parameter names from its signature"
            )
        self._ignore = frozenset(ignore)
        self._first = params[0].name if params else ""
        simple = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
        self._positional = len(params) if simple else -1
        self._skip_positions = frozenset(i for i, p in enumerate(params) if p.name in self._ignore)
        # Keys of recent all-scalar calls: hashing is most of a memory hit's cost. The
        # types are part of the memo key because 1, 1.0 and True are equal dict keys.
        self._memo: dict[tuple[Any, ...], str] = {}

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if not kwargs and len(args) == self._positional and not self._skip_positions:
            try:
                memo_key: tuple[Any, ...] | None = (*args, *map(type, args))
                found = self._memo.get(memo_key)  # type: ignore[arg-type]
            except TypeError:  # an unhashable argument
                memo_key, found = None, None
            if found is not None:
                return found
            key = self._compute(args, kwargs)
            if memo_key is not None and all(type(a) in _SCALARS for a in args):
                if len(self._memo) >= 4096:
                    self._memo.clear()
                self._memo[memo_key] = key
            return key
        return self._compute(args, kwargs)

    def _compute(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if not kwargs and len(args) == self._positional:
            values: tuple[Any, ...] = args
        else:
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = tuple(bound.arguments.values())
        parts = [
            None if (i in self._skip_positions or isinstance(v, _SESSION_TYPES)) else v
            for i, v in enumerate(values)
        ]
        classes = [
            f"{i}={v.__module__}.{v.__qualname__}"
            for i, v in enumerate(parts)
            if isinstance(v, type)
        ]
        if classes:
            parts = [None if isinstance(v, type) else v for v in parts]
        try:
            canonical = self._codec.canonical(tuple(parts))
        except UncacheableValueError as exc:
            raise self._explain(exc) from exc
        if classes:
            # After the one msgpack object that canonical() yields, so no call without
            # class arguments can produce these bytes.
            canonical += b"\x00" + "|".join(classes).encode()
        return f"{self._prefix}:{hash_bytes(canonical, self._codec.hash_salt)}"

    def _explain(self, exc: UncacheableValueError) -> UncacheableValueError:
        path = exc.path.replace("value", "args", 1)
        if path.startswith("args[0]") and self._first in ("self", "cls"):
            return UncacheableValueError(
                f"memoize on a method: {self._first} ({exc}) cannot be part of a cache key. "
                f"If the result does not depend on the instance, pass "
                f'memoize(ignore=("{self._first}",)); otherwise memoize a function of the '
                "values it depends on (an ORM instance is keyed by its identity)",
                path=exc.path,
            )
        return UncacheableValueError(
            f"argument {path} cannot be part of a cache key: {exc}. Pass a plain value "
            "instead, or list the parameter in memoize(ignore=...)",
            path=exc.path,
        )
