"""The models the cache-level tests share: the seed's API-key user, and its addresses."""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib

from sqlalchemy import DateTime, ForeignKey, Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "oc_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(200), unique=True)
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    active: Mapped[bool] = mapped_column(default=True)
    balance: Mapped[decimal.Decimal] = mapped_column(Numeric(12, 2), default=decimal.Decimal(0))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    addresses: Mapped[list[Address]] = relationship(
        back_populates="user", order_by="Address.id", cascade="all, delete-orphan"
    )


class Address(Base):
    __tablename__ = "oc_addresses"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("oc_users.id"), index=True)
    city: Mapped[str] = mapped_column(String(100))
    user: Mapped[User] = relationship(back_populates="addresses")


def key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def seed(session_factory: object, n: int = 3) -> list[str]:
    """Create ``n`` users with two addresses each; return their raw API keys."""
    keys = []
    with session_factory() as s:  # type: ignore[operator]
        for i in range(n):
            key = f"key-{i}-secret"
            keys.append(key)
            s.add(
                User(
                    id=i + 1,
                    name=f"user{i}",
                    email=f"user{i}@example.com",
                    api_key_hash=key_hash(key),
                    balance=decimal.Decimal("10.50") * (i + 1),
                    created_at=dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
                    addresses=[Address(city=f"city{i}a"), Address(city=f"city{i}b")],
                )
            )
        s.commit()
    return keys
