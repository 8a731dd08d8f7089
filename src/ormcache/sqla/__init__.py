"""SQLAlchemy integration: statement analysis, read/write tracking, loading, FromCache."""
