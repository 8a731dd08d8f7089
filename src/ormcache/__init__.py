"""ormcache: caching for SQLAlchemy 2.x ORM results that is safe, correct and fast."""
