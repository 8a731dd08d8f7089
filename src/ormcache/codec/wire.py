"""The wire format: what a payload's bytes are. Part of the stored format: change
nothing here without bumping :data:`VERSION`.

A payload is::

    b"OC" | version: 1 byte | flags: 1 byte | [HMAC-SHA256(secret, body): 32 bytes] | body

- ``version`` must be :data:`VERSION`; any other is a miss, so a format change bumps it
  and entries of the old format are simply replaced.
- ``flags``: bit 0 (:data:`FLAG_SIGNED`) says a 32-byte HMAC-SHA256 of the body, keyed by
  the cache's secret, follows. Other bits must be 0. A cache with a secret refuses
  unsigned payloads, and a cache without one refuses signed payloads.
- ``body`` is one msgpack array ``[mappers, instances, value]``:

  1. ``mappers``: per mapped class the payload uses, ``[key, fingerprint]``. The key is
     ``"module:qualname"`` and is looked up among the mapped classes this process has,
     never imported. The fingerprint is 8 bytes of BLAKE2b over the columns, their types
     and the relationships, so a schema change turns old payloads into misses.
  2. ``instances``: per instance, ``[mapper index, identity, columns, relationships]``.
     ``identity`` is ``[primary key values, identity token]`` or nil. ``columns`` follow
     the mapper's column order, with :data:`MISSING` for a column never loaded.
     ``relationships`` map a name to nil, an instance index, or a list of indexes, so
     shared and cyclic references survive.
  3. ``value``: the value itself. An instance in it is an :data:`INSTANCE` extension.

Strings are msgpack str (UTF-8), bytes are bin, ints within 64 bits are ints, lists and
dicts are arrays and maps. Every other type is an extension; "packed" below means the
extension's data is itself one msgpack object:

====  ==============  ==========================================================
code  name            data
====  ==============  ==========================================================
0     MISSING         empty: a column that was not loaded (in ``columns`` only)
1     TUPLE           packed array of the items
2     SET             packed array of the items
3     FROZENSET       packed array of the items
4     BIGINT          an int beyond 64 bits: big-endian two's complement
5     DATETIME        packed clock parts (below)
6     DATE            ISO 8601 text
7     TIME            packed clock parts (below)
8     TIMEDELTA       packed ``[days, seconds, microseconds]``
9     DECIMAL         ``str(value)`` as ASCII
10    UUID            the 16 bytes
11    ENUM            packed ``[enum key "module:qualname", member value]``
12    ROW             packed ``[[field names], [values]]`` (a SQLAlchemy Row)
13    INSTANCE        the instance's index in ``instances``, 4 bytes big-endian
14    CUSTOM          packed ``[registered name, encoded value]``
15    IDENTITY        canonical form only (below): packed ``[mapper key, [pk values]]``
16    DATETIME_ISO    ISO 8601 text of a naive or fixed-offset datetime
====  ==============  ==========================================================

Clock parts: ``[naive ISO text, fold]`` for a naive value, ``[naive, fold, "z", zone
key]`` for a ``zoneinfo`` zone, ``[naive, fold, "o", UTC offset in microseconds, zone
name or nil]`` for any other fixed offset. :data:`DATETIME_ISO` is the short form used
when the ISO text alone says everything (no fold, and no zone name of its own).

Nesting is bounded, and the bound is part of the format: a value nests at most
:data:`MAX_DEPTH` levels deep, where a list or dict counts 1 and a tuple, set, frozenset,
Row, Enum or custom value (whose items sit inside an extension's data) counts
:data:`EXT_LEVEL`. So extensions nest at most :data:`MAX_EXT_DEPTH` deep.

The **canonical form** hashes arguments into key names, so it is stored format too, but
it is never decoded: ``b"s"`` + a packed array for a tuple of plain scalars, else
``b"c"`` + the packed value, in which dicts and sets are SET extensions of their sorted
packed items and instances are IDENTITY extensions.
"""

from __future__ import annotations

import hmac
import threading

import msgpack

from ormcache.errors import CorruptPayloadError

MAGIC = b"OC"
VERSION = 1
FLAG_SIGNED = 1
HEADER = 4  # magic, version, flags
DIGEST = 32  # HMAC-SHA256

#: The ints msgpack stores natively; others are BIGINT.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1

# Extension type codes: never renumber.
MISSING, TUPLE, SET, FROZENSET, BIGINT, DATETIME, DATE, TIME = 0, 1, 2, 3, 4, 5, 6, 7
TIMEDELTA, DECIMAL, UUID, ENUM, ROW, INSTANCE, CUSTOM, IDENTITY = 8, 9, 10, 11, 12, 13, 14, 15
DATETIME_ISO = 16

MISSING_EXT = msgpack.ExtType(MISSING, b"")

#: How deep a value may nest. Encoding and walking a decoded value recurse once per
#: container, so this keeps them well inside Python's recursion limit wherever the
#: caller's own stack stands.
MAX_DEPTH = 128
#: What one extension with packed data (tuple, set, frozenset, Row, Enum, custom) counts
#: towards MAX_DEPTH. Decoding one runs msgpack's unpacker again from inside the last,
#: and each run keeps about 40 KiB on the C stack: about 200 levels overflow an 8 MiB
#: stack and kill the process.
EXT_LEVEL = 4
#: So extensions nest at most this deep (about 1.5 MiB of C stack).
MAX_EXT_DEPTH = MAX_DEPTH // EXT_LEVEL

_packers = threading.local()


def pack(obj: object) -> bytes:
    """``msgpack.packb`` on this thread's own Packer: building a Packer costs several
    times what packing a key's arguments does. A Packer empties its buffer after each
    call, failed ones included, and is never shared between threads."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)  # type: ignore[no-any-return]


def frame(body: bytes, secret: bytes | None) -> bytes:
    """The payload for ``body``: header, then the signature when there is a secret."""
    if secret is None:
        return MAGIC + bytes((VERSION, 0)) + body
    return MAGIC + bytes((VERSION, FLAG_SIGNED)) + hmac.digest(secret, body, "sha256") + body


def unframe(data: bytes, secret: bytes | None) -> bytes:
    """The body of a payload whose header and signature check out; else
    CorruptPayloadError, before a single byte of the body is parsed."""
    if len(data) < HEADER or data[:2] != MAGIC:
        raise CorruptPayloadError("not an ormcache payload (bad magic)")
    if data[2] != VERSION:
        raise CorruptPayloadError(f"payload version {data[2]} is not {VERSION}")
    flags = data[3]
    if flags & ~FLAG_SIGNED:
        raise CorruptPayloadError("unknown payload flags")
    signed = bool(flags & FLAG_SIGNED)
    if signed != (secret is not None):
        raise CorruptPayloadError(
            "payload signature mode differs from this cache's (secret set on one side only)"
        )
    body = data[HEADER:]
    if secret is not None:
        digest, body = body[:DIGEST], body[DIGEST:]
        if len(digest) != DIGEST or not hmac.compare_digest(
            digest, hmac.digest(secret, body, "sha256")
        ):
            raise CorruptPayloadError("payload signature does not match")
    return body
