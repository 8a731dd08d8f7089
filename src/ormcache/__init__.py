"""ormcache: caching for SQLAlchemy 2.x ORM results that is safe, correct and fast.

The public surface is deliberately small: the names below. Modules are internal unless
their ``__all__`` says otherwise (``ormcache.testing`` ships the backend conformance
suite; ``ormcache.backends`` holds the backends).
"""

from .backends.base import Backend, Snapshot
from .cache import Cache
from .codec import as_dict
from .errors import BackendError, ConfigurationError, OrmCacheError, UncacheableValueError
from .memoize import Memoized
from .sqla.fromcache import FromCache
from .stats import StatsSnapshot

__all__ = [
    "Backend",
    "BackendError",
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
