"""Signed entries: what ``secret=`` protects, and how.

Threat: someone who can write to the backend (Redis) but does not know the secret. They
can copy an entry to another key, rewrite the tags and generations the backend checks
(an empty header is always "current"), drop its expiry, or replay one captured earlier.
A MAC over the payload alone stops none of that: every such entry still carries a valid
signature. So the MAC binds everything a hit relies on:

- the **key name** and namespace: an entry moved to another key no longer verifies;
- the **tags and generations** the backend checked at this very ``get``
  (:class:`~ormcache.backends.base.Entry`): a rewritten header no longer verifies, and a
  genuine one is only served while its generations are current, so ``invalidate()``
  (a bump) ends a replayed entry as it ends the original;
- the **read path's header** (``fresh_until`` and the computation time): the expiry is
  enforced by the read path from this signed time, not only by the backend's TTL, which
  an attacker can remove (``PERSIST``) or that a backend may not keep;
- the **codec version** (this process's, and the payload's own version byte).

The backend never sees the secret: it returns what it checked, the read path verifies.

Not protected, and the README says so: reading cached data (entries are not encrypted);
denial of service (deleting or corrupting keys only causes misses); a leaked secret; an
attacker who also rolls the generation counters back can replay an entry they captured,
but only until the entry's signed expiry; and an entry deleted by ``fn.invalidate(...)``
(a delete, not a bump) can be replayed until its expiry or until what it read changes.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from .backends.base import Entry
from .codec.wire import VERSION
from .errors import CorruptPayloadError

__all__ = ["DIGEST", "Signer"]

DIGEST = 32  # HMAC-SHA256
_LEN = struct.Struct(">I")
_DOMAIN = b"ormcache-entry\x00"


def _field(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


def _gen(gen: int | bytes) -> bytes:
    return gen if isinstance(gen, bytes) else b"%d" % gen


class Signer:
    """HMAC-SHA256 over (codec version, key, tags and generations, header, payload).

    Every field is length-prefixed, so no two different inputs share a message.
    """

    __slots__ = ("_key",)

    def __init__(self, secret: bytes, namespace: str) -> None:
        # A key of its own (the secret also salts key-name hashes, see Codec.hash_salt),
        # and one per namespace, so an entry moved between namespaces does not verify.
        self._key = hashlib.blake2b(
            b"ormcache-entry-mac" + _field(namespace.encode()) + secret
        ).digest()

    def _mac(
        self, key: str, tags: tuple[str, ...], gens: tuple[int | bytes, ...], body: bytes
    ) -> bytes:
        parts = [_DOMAIN, bytes((VERSION,)), _field(key.encode()), _LEN.pack(len(tags))]
        for tag, gen in zip(tags, gens, strict=True):
            parts.append(_field(tag.encode()))
            parts.append(_field(_gen(gen)))
        parts.append(body)
        return hmac.digest(self._key, b"".join(parts), "sha256")

    def sign(
        self, key: str, tags: tuple[str, ...], gens: tuple[int, ...], header: bytes, payload: bytes
    ) -> bytes:
        """``header + MAC + payload``, for a store against ``tags`` at ``gens``."""
        return header + self._mac(key, tags, gens, header + payload) + payload

    def verify(self, key: str, entry: Entry, header_size: int) -> bytes:
        """``header + payload`` of a signed entry the backend served for ``key``; raises
        CorruptPayloadError if the MAC is missing or does not cover what was checked."""
        data = entry.payload
        if len(data) < header_size + DIGEST or len(entry.tags) != len(entry.gens):
            raise CorruptPayloadError("entry without its signature")
        header = data[:header_size]
        digest = data[header_size : header_size + DIGEST]
        body = header + data[header_size + DIGEST :]
        if not hmac.compare_digest(digest, self._mac(key, entry.tags, entry.gens, body)):
            raise CorruptPayloadError(
                "entry signature does not match its key, generations, expiry or version"
            )
        return body
