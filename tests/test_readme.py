"""The README's examples do what they say (issue 10 §6): the Quick start runs as pasted,
the flask-caching migration saves changes to a hit, the CLI examples reach the
namespace the application uses, and ``register_type`` has one spelling that works."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ormcache import Cache
from ormcache.cli import _build

README = (Path(__file__).parent.parent / "README.md").read_text()


def section(title: str) -> str:
    """The README text from a heading (or bold lead-in) to the next heading."""
    start = README.index(title)
    end = re.compile(r"^#{2,} ", re.MULTILINE).search(README, start + len(title))
    return README[start : end.start() if end else len(README)]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_the_quick_start_runs_as_pasted(tmp_path: Path) -> None:
    """It used ``engine``, ``User`` and ``h`` without defining them, and ended with
    ``cache.clear()``, which empties a namespace other processes share."""
    code = blocks(section("## Quick start"), "python")[0]
    assert ".clear()" not in code
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "hits=" in out.stdout


class MigrationBase(DeclarativeBase):
    pass


def test_the_flask_caching_migration_saves_changes_to_a_hit(tmp_path: Path) -> None:
    """The after-snippet lacked ``merge=True``: a hit was a detached copy, and changing it
    then calling ``db.session.commit()`` saved nothing, silently."""
    after = section("### Migrating from flask-caching").split("After:", 1)[1]
    decorator = re.search(r"@cache\.memoize\((.*?)\)", blocks(after, "python")[0])
    assert decorator is not None
    options: dict[str, Any] = eval(f"dict({decorator.group(1)})")  # the README's own text

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path}/migration.db"
    db = SQLAlchemy(app, model_class=MigrationBase)

    class Member(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = f"readme_members_{uuid.uuid4().hex[:6]}"
        id: Mapped[int] = mapped_column(primary_key=True)
        api_key_hash: Mapped[str] = mapped_column(String(64))
        name: Mapped[str] = mapped_column(String(50))

    cache = Cache()
    cache.init_app(app)
    cache.attach(db.session)

    @cache.memoize(**options)
    def get_user(api_key: str) -> Any:
        return Member.query.filter_by(api_key_hash=api_key).first()

    with app.app_context():
        db.create_all()
        db.session.add(Member(id=1, api_key_hash="h", name="ann"))
        db.session.commit()
    with app.app_context():
        get_user("h")
    with app.app_context():
        user = get_user("h")  # a hit
        assert cache.stats().hits == 1
        user.name = "bea"
        db.session.commit()
    with app.app_context():
        assert db.session.get(Member, 1).name == "bea"  # type: ignore[union-attr]
        db.drop_all()
    cache.close()


def _namespace_set(text: str) -> str | None:
    found = re.search(r"""(?:namespace=|ORMCACHE_NAMESPACE=|--namespace )["']?([\w.\-]+)""", text)
    return found.group(1) if found else None


def test_the_cli_examples_use_the_namespace_of_the_python_examples() -> None:
    """The Quick start used ``namespace="app"`` and the CLI examples passed none, so
    ``ormcache invalidate users`` bumped the ``ormcache`` namespace and left the
    application's entries in service."""
    cli_default = next(p.default for p in _build().params if p.name == "namespace")
    assert cli_default == Cache().namespace
    python_side = _namespace_set(blocks(section("## Quick start"), "python")[0]) or cli_default
    cli_text = section("**The `ormcache` command**")
    cli_side = _namespace_set(blocks(cli_text, "bash")[0]) or cli_default
    assert cli_side == python_side


@dataclasses.dataclass(frozen=True)
class Money:
    amount: int
    currency: str


def test_register_type_has_one_spelling_and_it_works() -> None:
    """The README said ``cache.codec.register_type(...)``; a Cache has no ``codec``."""
    assert "codec.register_type" not in README
    spans = [s for s in re.findall(r"`([^`]*register_type\([^`]*)`", README) if "Money" in s]
    assert spans, "the README shows how to register a type"
    cache = Cache()
    for span in spans:
        exec(span, {"cache": cache, "Money": Money})

    @cache.memoize
    def price(item: str) -> Money:
        return Money(5, "EUR")

    assert price("x") == price("x") == Money(5, "EUR")
    assert cache.stats().hits == 1


def test_an_unregistered_type_names_the_one_spelling() -> None:
    cache = Cache(strict=True)

    @cache.memoize
    def price(item: str) -> Money:
        return Money(5, "EUR")

    with pytest.raises(Exception, match=r"cache\.register_type\(\)"):
        price("x")
