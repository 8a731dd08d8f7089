"""ormcache: caching for SQLAlchemy 2.x ORM results that is safe, correct and fast.

The public surface is deliberately small; everything else lives in its own module.
``Backend`` and ``Snapshot`` are here for custom backends, ``Memoized`` and
``StatsSnapshot`` for type annotations.
"""

from .backends.base import Backend, Snapshot
from .cache import Cache
from .codec import as_dict
from .errors import ConfigurationError, OrmCacheError, UncacheableValueError
from .memoize import Memoized
from .orm import FromCache
from .stats import StatsSnapshot

__all__ = [
    "Backend",
    "Cache",
    "ConfigurationError",
    "FromCache",
    "Memoized",
    "OrmCacheError",
    "Snapshot",
    "StatsSnapshot",
    "UncacheableValueError",
    "as_dict",
]
__version__ = "0.1.0"
