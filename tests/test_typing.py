"""The public API's static types hold: ``memoize`` keeps the wrapped signature."""

from __future__ import annotations

from pathlib import Path

from mypy import api

import ormcache


def test_typing_file_type_checks() -> None:
    """``tests/typing/check_api.py`` passes mypy --strict (and its type: ignores are needed)."""
    path = Path(__file__).parent / "typing" / "check_api.py"
    stdout, stderr, status = api.run(
        ["--strict", "--warn-unused-ignores", "--no-incremental", str(path)]
    )
    assert status == 0, stdout + stderr


def test_exported_names_are_exactly_the_contract() -> None:
    """The top level re-exports the contract's names, what custom backends and typed
    callers need, and nothing else."""
    assert sorted(ormcache.__all__) == [
        "Backend",
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
    for name in ormcache.__all__:
        assert getattr(ormcache, name).__module__.startswith("ormcache.")
