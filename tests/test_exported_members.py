"""The public surface is exactly what the README documents, and importing it needs only
the core dependencies (SQLAlchemy and msgpack): Flask, Redis and click are extras."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import ormcache

# Written out, not derived from __all__: this is what the test pins.
PUBLIC = {
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
}


def test_all_is_exactly_the_public_contract() -> None:
    assert set(ormcache.__all__) == PUBLIC
    assert len(ormcache.__all__) == len(PUBLIC), "no name listed twice"


def test_every_exported_name_is_importable_and_defined_by_ormcache() -> None:
    for name in ormcache.__all__:
        namespace: dict[str, object] = {}
        exec(f"from ormcache import {name}", namespace)
        obj = namespace[name]
        assert obj is getattr(ormcache, name)
        assert obj.__module__.startswith("ormcache."), (name, obj.__module__)


def test_nothing_else_public_is_exported() -> None:
    """Every public attribute of the package is in ``__all__``. Submodules are reached
    by their path and are not re-exports, so they are left out of this check."""
    public = {
        name
        for name, value in vars(ormcache).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(ormcache.__all__)


BLOCKED = ("flask", "redis", "click")

WITHOUT_EXTRAS = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}


    class Missing:
        '''Pretends the extras are not installed: importing them fails as if absent.'''

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"No module named {{name!r}} (blocked by the test)")
            return None


    sys.meta_path.insert(0, Missing())
    for extra in BLOCKED:
        try:
            __import__(extra)
        except ImportError:
            pass
        else:
            raise SystemExit(f"the import hook did not block {{extra}}")

    import ormcache

    cache = ormcache.Cache()

    @cache.memoize(ttl=60)
    def double(x):
        return 2 * x

    assert double(21) == 42
    assert double(21) == 42
    assert cache.stats().hits == 1, cache.stats()
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("ok")
    """
).format(blocked=BLOCKED)


def test_import_and_default_cache_work_without_flask_redis_or_click() -> None:
    """The embedded default (memory backend) must not need any extra installed."""
    # The child imports the same ormcache as this process, not another installed copy.
    src = os.path.dirname(os.path.dirname(ormcache.__file__))
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRAS],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"
