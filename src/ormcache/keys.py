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

__all__ = ["ArgumentKeyer", "function_prefix", "hash_bytes"]

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


def function_prefix(fn: Callable[..., Any], version: str | int | None = None) -> str:
    """``m:<module>.<qualname>[:<version>]`` — bump ``version`` when the function's output
    format changes, so old entries are never decoded as the new shape."""
    name = f"m:{fn.__module__}.{fn.__qualname__}"
    if version is not None:
        name = f"{name}:{version}"
    if any(ch.isspace() for ch in name):
        name = name.replace(" ", "_").replace("\n", "_").replace("\t", "_")
    return name


class ArgumentKeyer:
    """Turns a call's arguments into a key, treating ``f(1)`` and ``f(x=1)`` alike.

    The common case (all arguments positional, none defaulted) skips
    ``Signature.bind``, which alone would cost more than a memory-backend hit.
    """

    __slots__ = (
        "_codec",
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
        try:
            canonical = self._codec.canonical(tuple(parts))
        except UncacheableValueError as exc:
            raise UncacheableValueError(
                f"argument {exc.path.replace('value', 'args', 1)} cannot be part of a cache "
                f"key: {exc}. Pass a plain value instead, or list the parameter in "
                "memoize(ignore=...)",
                path=exc.path,
            ) from exc
        return f"{self._prefix}:{hash_bytes(canonical, self._codec.hash_salt)}"
