"""Counting the statements a database receives: the oracle for "a hit runs no SQL"."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event

__all__ = ["SQLCounter"]


class SQLCounter:
    """Counts statements sent to the database, the oracle for "a hit runs no SQL".

    It listens on ``before_cursor_execute``, the point every statement crosses, so it
    sees ORM, Core and driver SQL alike (pass ``AsyncEngine.sync_engine`` for asyncio).
    """

    def __init__(self, engine: Any) -> None:
        self.count = 0
        self.statements: list[str] = []

        def before(conn: object, cursor: object, statement: str, *args: object) -> None:
            self.count += 1
            self.statements.append(statement)

        event.listen(engine, "before_cursor_execute", before)

    def reset(self) -> None:
        self.count = 0
        self.statements.clear()
