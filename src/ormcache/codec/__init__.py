"""The snapshot codec: typed, versioned msgpack. No pickle, no imports, no code.

Decoding builds only what this process has registered: mapped classes found in
SQLAlchemy's registries (looked up by name, never imported), Enum classes and custom
types registered with :meth:`Codec.register_type`. Any payload that fails any check
raises :class:`~ormcache.errors.CorruptPayloadError`, which the cache treats as a miss.

The modules, each readable on its own:

- ``wire``: the bytes of a payload (header, signature, body layout, extension codes);
- ``registry``: what a payload may name (mapped classes, enums, custom types);
- ``encode``: values to msgpack, one handler per type;
- ``canonical``: arguments to the deterministic bytes hashed into keys;
- ``decode``: msgpack back to values, one handler per extension code;
- ``memo``: the checked form of a payload, and a bounded memo of recent ones;
- ``hydrate``: building instances (into a session) from the checked form;
- ``core``: :class:`Codec`, which ties them together, and ``as_dict``.
"""

from .core import Codec, as_dict
from .hydrate import Adopter

__all__ = ["Adopter", "Codec", "as_dict"]
