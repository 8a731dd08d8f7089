"""pytest plugin that integrates ormcache into ihatemoney before its tests import it.

Load it with ``-p examples.realapp.plugin`` (the driver does). ``ORMCACHE_URL`` and
``ORMCACHE_NAMESPACE`` pick the cache; ``REALAPP_STATS`` names a JSON file that receives
``cache.stats()`` when the session ends, so the summary can show the cache was used.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from ormcache import Cache

from .ihatemoney_cache import install

cache = install(Cache())


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    from ihatemoney.models import db

    path = os.environ.get("REALAPP_STATS")
    if path:
        stats = dataclasses.asdict(cache.stats())
        # The factory attached db.session once per test: one set of listeners must remain.
        with db.session.session_factory() as probe:
            stats["do_orm_execute_listeners"] = len(probe.dispatch.do_orm_execute)
        with open(path, "w") as fh:
            json.dump(stats, fh)
