"""Users and their API keys. Keys are stored only as SHA-256 hashes."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlalchemy import DateTime, ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# A binary collation makes MariaDB compare hashes byte for byte, so lookups by hash can be
# cached per hash (an equality partition) instead of per table.
HASH_TYPE = String(64).with_variant(String(64, collation="ascii_bin"), "mysql", "mariadb")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_api_key() -> str:
    """A 256-bit random key with a recognisable prefix (for secret scanners)."""
    return "oc_" + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


# Names and e-mails are any Unicode: on a MariaDB/MySQL server whose default character
# set is latin1 or utf8mb3, an emoji in a name would be a database error (a 500).
_UNICODE_TABLE = {"mysql_charset": "utf8mb4", "mariadb_charset": "utf8mb4"}


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "ks_users"
    __table_args__ = _UNICODE_TABLE

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(254), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    keys: Mapped[list[ApiKey]] = relationship(back_populates="user", order_by="ApiKey.id")


class ApiKey(Base):
    __tablename__ = "ks_api_keys"
    __table_args__ = _UNICODE_TABLE

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("ks_users.id"), index=True)
    key_hash: Mapped[str] = mapped_column(HASH_TYPE, unique=True)
    prefix: Mapped[str] = mapped_column(String(12))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    user: Mapped[User] = relationship(back_populates="keys", lazy="joined", innerjoin=True)
