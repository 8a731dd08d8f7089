"""The public API's static types hold: ``memoize`` keeps the wrapped signature."""

from __future__ import annotations

from pathlib import Path

from mypy import api


def test_typing_file_type_checks() -> None:
    """``tests/typing/check_api.py`` passes mypy --strict (and its type: ignores are needed)."""
    path = Path(__file__).parent / "typing" / "check_api.py"
    stdout, stderr, status = api.run(
        ["--strict", "--warn-unused-ignores", "--no-incremental", str(path)]
    )
    assert status == 0, stdout + stderr
