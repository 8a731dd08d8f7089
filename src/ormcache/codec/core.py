"""``Codec``: the one object the rest of ormcache uses to turn values into payloads,
arguments into key bytes, and payloads back into values; and ``as_dict``, the way to
cache an instance's columns as a plain dict."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import inspect
from sqlalchemy.orm import Mapper

from ormcache.errors import CorruptPayloadError, UncacheableValueError

from .canonical import encode_canonical
from .decode import read_body
from .encode import encode_body
from .hydrate import Adopter, materialize
from .memo import Parsed, ParseMemo
from .registry import MapperInfo, Registry
from .wire import frame, unframe

T = TypeVar("T")


class Codec:
    """Encodes values to payloads and back; one per ``Cache``.

    Thread-safe: the registry is only ever added to, under a lock, and the parse memo
    hands out nothing mutable.
    """

    def __init__(self, *, secret: bytes | None = None, sign: bool = True) -> None:
        # ``sign=False``: the secret only salts key hashes, because the caller signs
        # more than the payload (a Cache signs whole entries: see ``ormcache.signing``).
        self._secret = secret if sign else None
        #: Keys the hashes of values in key names and tags when a secret is configured,
        #: so a Redis reader cannot confirm guessed values by hashing them.
        self.hash_salt: bytes | None = (
            None if secret is None else hashlib.blake2b(b"ormcache-keys" + secret).digest()[:32]
        )
        #: What payloads may name (see ``registry``).
        self.registry = Registry()
        #: Recently decoded payloads with instances (see ``memo``).
        self.parsed = ParseMemo()

    # -- registries -------------------------------------------------------------------
    def adopt_registrations(self, other: Codec) -> None:
        """Take over another codec's custom types and enums (a reconfigured cache must not
        forget what the application registered)."""
        self.registry.adopt(other.registry)

    def register_type(
        self,
        cls: type[T],
        *,
        name: str,
        encode: Callable[[T], Any],
        decode: Callable[[Any], T],
    ) -> None:
        """The one hook for custom types: ``encode`` must return a storable value and
        ``decode`` must rebuild the object from it. ``name`` goes into payloads, so keep
        it stable across releases."""
        self.registry.add_type(cls, (name, encode, decode))

    def register_enum(self, cls: type[enum.Enum]) -> str:
        """Allow ``cls`` members in payloads (done automatically for mapped Enum columns
        and for enums met while encoding); returns its registry name."""
        return self.registry.register_enum(cls)

    def mapper_info(self, mapper: Mapper[Any]) -> MapperInfo:
        return self.registry.mapper_info(mapper)

    # -- encode -----------------------------------------------------------------------
    def encode(
        self, value: object, *, on_instance: Callable[[object], None] | None = None
    ) -> bytes:
        """The payload for ``value``; raises UncacheableValueError naming the bad part.

        ``on_instance`` is called with each mapped instance the payload snapshots.
        """
        return frame(encode_body(self.registry, value, on_instance), self._secret)

    def canonical(self, value: object) -> bytes:
        """Deterministic bytes for hashing arguments into keys (not decodable); raises
        UncacheableValueError naming the bad part."""
        return encode_canonical(self.registry, value)

    # -- decode -----------------------------------------------------------------------
    def decode(self, data: bytes, *, into: Adopter | None = None) -> object:
        """The value in a payload; CorruptPayloadError for anything not written by us.

        With ``into``, instances whose identity ``into`` already holds are not built: the
        held object stands in, and only its unloaded attributes are filled from the
        payload (a database load's rule). The others are built and handed to
        ``into.register``.
        """
        try:
            return self._decode(data, into)
        except CorruptPayloadError:
            raise
        except Exception as exc:
            raise CorruptPayloadError(
                f"payload could not be decoded ({type(exc).__name__})"
            ) from exc

    def _decode(self, data: bytes, into: Adopter | None) -> object:
        if type(data) is not bytes:
            data = bytes(data)
        parsed = self.parsed.get(data)
        if parsed is not None:
            # These very bytes passed every check before (the registries only grow).
            return materialize(parsed, True, into)
        body = read_body(unframe(data, self._secret), self.registry)
        if not body.instances:
            return body.root
        parsed = Parsed(body.mappers, body.instances, body.root)
        memo = not body.custom and self.parsed.admits(data)
        # A memoized parse is shared: even this first copy must not hand out its lists.
        value = materialize(parsed, memo, into)
        if memo:
            self.parsed.remember(data, parsed)
        return value


def as_dict(obj: object) -> dict[str, Any]:
    """The mapped instance's column attributes as a plain dict, ready to cache.

    Use it instead of ``obj.__dict__``, which carries ``_sa_instance_state`` (the seed's
    outage). Loaded attributes are read as they are; unloaded non-deferred ones are read
    normally (which may refresh an expired object); unloaded deferred ones are skipped.
    """
    state: Any = inspect(obj, raiseerr=False)
    if state is None or not hasattr(state, "mapper"):
        raise UncacheableValueError(
            f"as_dict() takes a mapped instance, got a {type(obj).__name__}", path="value"
        )
    out: dict[str, Any] = {}
    loaded = state.dict
    for prop in state.mapper.column_attrs:
        if prop.key in loaded:
            out[prop.key] = loaded[prop.key]
        elif not prop.deferred:
            out[prop.key] = getattr(obj, prop.key)
    return out
