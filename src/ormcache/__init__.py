"""ormcache: caching for SQLAlchemy 2.x ORM results that is safe, correct and fast.

The public surface is deliberately small; everything else lives in its own module.
"""

from .cache import Cache
from .codec import as_dict
from .errors import OrmCacheError, UncacheableValueError
from .orm import FromCache

__all__ = ["Cache", "FromCache", "OrmCacheError", "UncacheableValueError", "as_dict"]
__version__ = "0.1.0"
