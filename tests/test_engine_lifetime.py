"""An attached session class does not keep the engines it used alive (issue 10, section 5).

Found by running ihatemoney's own test suite on PostgreSQL with ormcache integrated
(``examples/realapp``): the application factory runs once per test, Flask-SQLAlchemy
makes a new engine for each app, and the cache kept every engine its sessions had bound
to (and each engine's pooled connection), so after about 100 tests PostgreSQL refused
connections: ``FATAL: sorry, too many clients already``.
"""

from __future__ import annotations

import gc
import weakref

from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from ormcache import Cache, FromCache
from tests.models import Base, User, seed


def test_engines_a_tracked_session_bound_to_are_freed_with_the_application(
    cache: Cache, tmp_path: object
) -> None:
    """Once the application drops an engine, the cache holds no reference to it; commits
    through the engines still alive keep invalidating."""
    Session = sessionmaker()
    cache.attach(Session)
    freed = []
    for i in range(3):
        engine = create_engine(f"sqlite:///{tmp_path}/app{i}.db")  # type: ignore[str-bytes-safe]
        Base.metadata.create_all(engine)
        seed(sessionmaker(engine), n=1)
        with Session(bind=engine) as s:
            s.scalars(select(User).options(FromCache(ttl=60))).all()
            s.get(User, 1).name = f"renamed{i}"  # type: ignore[union-attr]
            s.commit()
        freed.append(weakref.ref(engine))
        del engine, s
    gc.collect()
    assert [ref() is None for ref in freed] == [True, True, True]

    engine = create_engine(f"sqlite:///{tmp_path}/live.db")  # type: ignore[str-bytes-safe]
    Base.metadata.create_all(engine)
    seed(sessionmaker(engine), n=1)
    stmt = select(User.name).where(User.id == 1).options(FromCache(ttl=60))
    with Session(bind=engine) as s:
        assert s.scalars(stmt).one() == "user0"
        s.get(User, 1).name = "changed"  # type: ignore[union-attr]
        s.commit()
    with Session(bind=engine) as s:
        assert s.scalars(stmt).one() == "changed"
    engine.dispose()
