"""Which function a memoized entry belongs to: a name every process agrees on.

A key prefix must be the same in every process (two gunicorn workers share entries for
the same function), so it cannot use ``id()``; and it must differ between functions that
compute different things, which ``module.qualname`` alone does not: closures made by one
factory share a qualname, and so do all lambdas of a scope. The rule:

- The prefix is ``m:<module>.<qualname>`` (``<name>`` instead of the qualname when
  ``memoize(name=...)`` gives one), then ``:<version>`` when given.
- What a closure closes over, a ``functools.partial``'s bound arguments and a bound
  method's ``__self__`` are part of the function. When each of them has a description
  that is the same in every process (a scalar, a class, a function, a module, tuples of
  these), a digest of the descriptions joins the prefix, so ``make_getter(User)`` and
  ``make_getter(Order)`` get entries of their own everywhere. Sessions, sessionmakers and
  engines say where to read, not what, and are left out (as session arguments are).
- Within one cache, a second *different* function under a prefix already taken is
  refused at decoration time with :class:`~ormcache.ConfigurationError`, saying how to
  name it. The same function decorated again (an application factory running twice, a
  module reloaded: equal code, and the same values closed over) shares the entries.
  Under an explicit ``name=`` the values closed over may differ: the name vouches that
  they do not change the result.
- Lambdas and callable objects have no distinguishing name, so they need ``name=``.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from .errors import ConfigurationError

__all__ = ["FunctionIdentity", "Registry", "identify"]

_SOURCE_TYPES: tuple[type, ...] = (Session, scoped_session, sessionmaker, Connection, Engine)
try:
    from sqlalchemy.ext.asyncio import (
        AsyncConnection,
        AsyncEngine,
        AsyncSession,
        async_scoped_session,
        async_sessionmaker,
    )

    _SOURCE_TYPES += (
        AsyncSession,
        async_scoped_session,
        async_sessionmaker,
        AsyncConnection,
        AsyncEngine,
    )
except ImportError:  # pragma: no cover - depends on the SQLAlchemy build
    pass

_SCALARS = (type(None), bool, int, float, str, bytes)
_EMPTY = object()  # a closure cell not filled yet (a function that refers to itself)


@dataclass(frozen=True)
class FunctionIdentity:
    """A memoized function's prefix, and what decides whether two functions are one."""

    prefix: str
    #: The code object (None for callables that are not Python functions).
    code: types.CodeType | None
    #: (label, value) for each value the function closes over or was bound to.
    bound: tuple[tuple[str, Any], ...] = field(default=())
    explicit: bool = False
    label: str = ""


def _base(fn: Callable[..., Any]) -> tuple[Any, list[tuple[str, Any]]]:
    """The underlying function, and the values bound to it along the way."""
    bound: list[tuple[str, Any]] = []
    while True:
        if isinstance(fn, functools.partial):
            bound += [(f"partial argument {i}", v) for i, v in enumerate(fn.args)]
            bound += [(f"partial keyword {k!r}", v) for k, v in sorted(fn.keywords.items())]
            fn = fn.func
        elif isinstance(fn, types.MethodType):
            bound.append(("__self__", fn.__self__))
            fn = fn.__func__
        else:
            break
    if isinstance(fn, types.FunctionType):
        code = fn.__code__
        cells = fn.__closure__ or ()
        for var, cell in zip(code.co_freevars, cells, strict=False):
            try:
                value = cell.cell_contents
            except ValueError:
                value = _EMPTY
            bound.append((f"closure variable {var!r}", value))
        # Default values are not part of the identity: every call is keyed with its
        # defaults applied, so functions that differ only in them never share an entry.
    return fn, bound


def _describe(value: Any, depth: int = 0) -> str | None:
    """A description of ``value`` that every process gives alike, or None."""
    if isinstance(value, _SOURCE_TYPES):
        return "source"
    t = type(value)
    if t in _SCALARS:
        return f"{t.__name__}:{value!r}"
    if value is _EMPTY:
        return "empty"
    if isinstance(value, enum.Enum):
        return f"enum:{t.__module__}.{t.__qualname__}.{value.name}"
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        return f"def:{value.__module__}.{value.__qualname__}"
    if isinstance(value, types.ModuleType):
        return f"module:{value.__name__}"
    if t in (tuple, frozenset) and depth < 4:
        parts = [_describe(v, depth + 1) for v in value]
        if any(p is None for p in parts):
            return None
        items = sorted(parts) if t is frozenset else parts  # type: ignore[type-var]
        return f"{t.__name__}:({','.join(items)})"  # type: ignore[arg-type]
    return None


def identify(
    fn: Callable[..., Any], *, name: str | None = None, version: str | int | None = None
) -> FunctionIdentity:
    """The identity of ``fn`` under ``memoize(name=..., version=...)`` (see the module)."""
    base, bound = _base(fn)
    module = getattr(base, "__module__", None) or type(base).__module__
    qualname = getattr(base, "__qualname__", None)
    label = f"{module}.{qualname or type(base).__qualname__}"
    if name is not None:
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"memoize(name=...) must be a non-empty string, got {name!r}")
        prefix = f"m:{module}.{name}"
    elif not isinstance(qualname, str):
        raise ConfigurationError(
            f"memoize() cannot name {fn!r} (a {type(base).__qualname__}, not a function): "
            "pass memoize(name='...') with a name for it that is the same in every process"
        )
    elif "<lambda>" in qualname:
        raise ConfigurationError(
            f"memoize() cannot tell lambdas apart (every lambda in {module} is named "
            f"{qualname!r}): give it a name, cache.memoize(name='square')(lambda x: ...), "
            "or memoize a def"
        )
    else:
        prefix = f"m:{module}.{qualname}"
        described = [_describe(v) for _, v in bound]
        if described and all(d is not None for d in described) and set(described) != {"source"}:
            digest = hashlib.blake2b("|".join(described).encode(), digest_size=6)  # type: ignore[arg-type]
            prefix = f"{prefix}~{digest.hexdigest()}"
    if version is not None:
        prefix = f"{prefix}:{version}"
    if any(ch.isspace() for ch in prefix):
        prefix = "".join("_" if ch.isspace() else ch for ch in prefix)
    code = getattr(base, "__code__", None)
    return FunctionIdentity(
        prefix,
        code if isinstance(code, types.CodeType) else None,
        tuple(bound),
        explicit=name is not None,
        label=label,
    )


def _same(a: Any, b: Any, depth: int = 0) -> bool:
    if a is b:
        return True
    if isinstance(a, _SOURCE_TYPES) and isinstance(b, _SOURCE_TYPES):
        return True
    if isinstance(a, types.FunctionType) and isinstance(b, types.FunctionType):
        # A helper defined inside an application factory is a new object on each run.
        if depth > 3 or a.__code__ != b.__code__:
            return False
        _, bound_a = _base(a)
        _, bound_b = _base(b)
        return len(bound_a) == len(bound_b) and all(
            _same(x, y, depth + 1) for (_, x), (_, y) in zip(bound_a, bound_b, strict=True)
        )
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # an __eq__ that cannot answer means "not known equal"
        return False


class Registry:
    """The prefixes one cache has handed out, so that two functions never share one."""

    def __init__(self) -> None:
        self._taken: dict[str, FunctionIdentity] = {}

    def claim(self, ident: FunctionIdentity) -> None:
        """Record ``ident``; ConfigurationError if another function holds its prefix."""
        held = self._taken.get(ident.prefix)
        if held is None:
            self._taken[ident.prefix] = ident
            return
        if held.code is None or ident.code is None or held.code != ident.code:
            raise ConfigurationError(
                f"memoize(): {ident.label} and an earlier memoized {held.label} would share "
                f"the key prefix {ident.prefix!r} and return each other's results; give "
                "one of them its own name, e.g. cache.memoize(name='...')"
            )
        if ident.explicit:
            return  # the name vouches that what they close over does not matter
        if [label for label, _ in ident.bound] != [label for label, _ in held.bound]:
            raise ConfigurationError(
                f"memoize(): {ident.label} was memoized before with other bound arguments, "
                f"and the two would share the key prefix {ident.prefix!r}; give each its "
                "own name, e.g. cache.memoize(name='...')"
            )
        for (label, mine), (_, theirs) in zip(ident.bound, held.bound, strict=True):
            if not _same(mine, theirs):
                raise ConfigurationError(
                    f"memoize(): {ident.label} was memoized before with another value of "
                    f"its {label}, so the two compute different things but would share "
                    f"the key prefix {ident.prefix!r}; give each its own name, e.g. "
                    "cache.memoize(name=f'get_{model.__name__}'), or pass the value as "
                    "an argument"
                )
