"""Type-checked by mypy (see tests/test_typing.py), never run: the public API's types."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from typing_extensions import assert_type

from ormcache import Cache, FromCache, OrmCacheError, UncacheableValueError, as_dict


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


cache = Cache("redis://127.0.0.1:6379/0", namespace="app", default_ttl=300)


@cache.memoize(ttl=60)
def get_user(api_key: str, *, active: bool = True) -> User | None:
    return None


@cache.memoize
def count(n: int) -> int:
    return n


square = cache.memoize(name="square")(lambda x: x * x)


class Repo:
    @cache.memoize(ignore=("self",))
    def find(self, pk: int) -> User | None:
        return None


assert_type(Repo().find(1), User | None)
Repo().find.invalidate(1)
assert_type(get_user("k"), User | None)
assert_type(get_user("k", active=False), User | None)
assert_type(count(3), int)
get_user.invalidate("k")
assert_type(get_user.cache_key("k"), str)
get_user(1)  # type: ignore[arg-type]
get_user("k", bogus=True)  # type: ignore[call-arg]
cache.invalidate(User)
stmt = select(User).options(FromCache(ttl=60))
assert_type(as_dict(User()), dict[str, Any])
issubclass(UncacheableValueError, OrmCacheError)
