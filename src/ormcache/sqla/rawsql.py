"""Raw SQL, parsed for real: the tables a statement reads and writes, per dialect.

``text()``, driver SQL and the text fragments inside SQLAlchemy statements are parsed
with **sqlglot** into a syntax tree, and the answers come from walking that tree. The
choice: sqlglot is maintained (several releases a month), pure Python (no compiler on
the install path), knows the dialects we run on (PostgreSQL, MySQL/MariaDB, SQLite) and
builds a real AST in which a CTE name, a subquery, a ``JOIN`` and an ``UPDATE`` target
are distinct nodes. sqlparse only splits tokens into loose groups (no tree of what
``UPDATE a JOIN b`` writes); pglast wraps PostgreSQL's own parser, exact there, but it
is a C extension and PostgreSQL only. Regular expressions were what we had before, and
they missed comma joins, ``WITH … UPDATE``, ``TRUNCATE a, b`` and more.

The rules are conservative, as a stale read is worse than a miss:

* a read is every table named anywhere (FROM, joins, subqueries, CTE bodies), under every
  name the SQLAlchemy ``Table.fullname`` could have (``public.t`` also as ``t``);
* a write is every table a statement can write, DML inside a CTE included;
* anything not understood (unparsable, several statements, ``CALL``, ``DO``, ``SET``,
  a function that is not known to write nothing) writes the whole namespace, and is
  never a read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import sqlglot
from sqlglot import TokenType, exp
from sqlglot.errors import SqlglotError

from ormcache.protocol import NAMESPACE_TAG

from .functions import FunctionRules, classify

__all__ = [
    "SqlFacts",
    "fragment_facts",
    "sql_facts",
    "sqlglot_dialect",
    "text_is_read",
    "text_read_tags",
    "text_write_tags",
]

_DIALECTS = {
    "postgresql": "postgres",
    "postgres": "postgres",
    "mysql": "mysql",
    "mariadb": "mysql",
    "sqlite": "sqlite",
}


def sqlglot_dialect(name: str | None) -> str | None:
    """sqlglot's name for a SQLAlchemy dialect name; None (sqlglot's default) if unknown."""
    return _DIALECTS.get(name.lower()) if name else None


@dataclass(frozen=True)
class SqlFacts:
    """What one piece of SQL does, as far as caching cares.

    ``reads`` holds every name a table reference may stand for; ``references`` has one
    entry per reference (a self-join has two; a correlated column has none), each the
    names that reference may stand for.
    ``understood`` is False when the text did not parse into exactly one statement of a
    kind this module knows; every other field is then empty and the text must be
    treated as a write to everything.
    """

    understood: bool
    is_query: bool = False
    reads: frozenset[str] = frozenset()
    references: tuple[frozenset[str], ...] = ()
    writes: frozenset[str] = frozenset()
    writes_unknown: bool = False
    functions: frozenset[str] = frozenset()
    time_literal: bool = False
    locking: str | None = None


_NOT_UNDERSTOOD = SqlFacts(understood=False)
# Older sqlglot releases name two of these classes differently (Union, AlterTable).
_SET_OPERATION: type[exp.Expr] = getattr(exp, "SetOperation", None) or exp.Union
_ALTER: type[exp.Expr] = getattr(exp, "Alter", None) or getattr(exp, "AlterTable")  # noqa: B009
_QUERIES = (exp.Select, _SET_OPERATION, exp.Values, exp.Subquery)
_WRITERS = (
    exp.Insert,
    exp.Update,
    exp.Delete,
    exp.Merge,
    exp.TruncateTable,
    exp.Create,
    exp.Drop,
    _ALTER,
)
_STATEMENTS = (*_QUERIES, *_WRITERS)
# Bare words PostgreSQL (and the standard) evaluate as functions without parentheses.
_NILADIC = frozenset(
    {"current_user", "session_user", "current_role", "system_user", "current_schema"}
    | {"current_catalog", "current_date", "current_time", "current_timestamp"}
    | {"localtime", "localtimestamp"}
)
# PostgreSQL reads these string literals as the current time when cast to a date/time
# (also implicitly, in ``ts > 'now'``); SQLite's date functions take 'now'.
_TIME_WORDS = frozenset({"now", "today", "tomorrow", "yesterday"})
# DDL whose named table is what it changes.
_DDL_KINDS = frozenset({"TABLE", "VIEW", "MATERIALIZED VIEW", "INDEX", "UNIQUE INDEX"})


@functools.lru_cache(maxsize=4096)
def sql_facts(text: str, dialect: str | None = None) -> SqlFacts:
    """The facts of one SQL statement; memoized per (text, dialect)."""
    read = sqlglot_dialect(dialect)
    tree = _parse_statement(text, read)
    if tree is None or not isinstance(tree, _STATEMENTS):
        return _NOT_UNDERSTOOD
    return _facts(tree, read, is_query=isinstance(tree, _QUERIES))


@functools.lru_cache(maxsize=4096)
def fragment_facts(text: str, dialect: str | None = None) -> SqlFacts:
    """Facts of a fragment inside a SQLAlchemy statement (``literal_column``, ``text``).

    A fragment may be an expression (``now() > x``), a whole query, or a FROM item
    (``users JOIN addresses ON …``); each is tried in turn.
    """
    read = sqlglot_dialect(dialect)
    # Only parsed, never executed.
    for candidate in (text, f"SELECT * FROM {text}"):  # noqa: S608
        tree = _parse_statement(candidate, read)
        if tree is not None and not isinstance(tree, exp.Command):
            return _facts(tree, read, is_query=isinstance(tree, _QUERIES))
    return _NOT_UNDERSTOOD


def _parse_statement(text: str, read: str | None) -> exp.Expr | None:
    """One parsed statement, or None for zero, several, or a parse error."""
    try:
        trees = sqlglot.parse(text, read=read)
    except SqlglotError:
        if "%" not in text:
            return None
        try:
            trees = sqlglot.parse(_qmark_placeholders(text, read), read=read)
        except SqlglotError:
            return None
    trees = [t for t in trees if t is not None]
    if len(trees) != 1:
        return None
    tree = trees[0]
    if isinstance(tree, exp.Command) and str(tree.this).upper() == "REPLACE":
        # MySQL's REPLACE INTO is an INSERT that may delete first: the same table.
        rest = tree.expression.name if isinstance(tree.expression, exp.Literal) else ""
        return _parse_statement(f"INSERT {rest}", read) if rest else None
    return tree


def _qmark_placeholders(text: str, read: str | None) -> str:
    """Driver SQL in the ``format``/``pyformat`` styles (``%s``, ``%(name)s``), which
    the MySQL and SQLite grammars take for a modulo: rewrite those tokens to ``?``.

    Tokens, not characters, are rewritten, so a ``%s`` inside a string literal stays.
    """
    tokens = sqlglot.Dialect.get_or_raise(read).tokenize(text)
    out: list[str] = []
    pos = i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.token_type is TokenType.MOD:
            nxt = tokens[i + 1 : i + 5]
            if nxt and nxt[0].start == tok.end + 1 and nxt[0].text == "s":
                out += [text[pos : tok.start], "?"]
                pos, i = nxt[0].end + 1, i + 2
                continue
            if (
                len(nxt) == 4
                and nxt[0].token_type is TokenType.L_PAREN
                and nxt[2].token_type is TokenType.R_PAREN
                and nxt[3].text == "s"
                and nxt[3].start == nxt[2].end + 1
            ):
                out += [text[pos : tok.start], "?"]
                pos, i = nxt[3].end + 1, i + 5
                continue
            if nxt and nxt[0].token_type is TokenType.MOD and nxt[0].start == tok.end + 1:
                out += [text[pos : tok.start], "%"]
                pos, i = nxt[0].end + 1, i + 2
                continue
        i += 1
    out.append(text[pos:])
    return "".join(out)


def _facts(tree: exp.Expr, read: str | None, is_query: bool) -> SqlFacts:
    ctes = {n for cte in tree.find_all(exp.CTE) for n in _variants(cte.args.get("alias"), read)}
    references: list[frozenset[str]] = []
    for table in tree.find_all(exp.Table):
        names = _table_names(table, read)
        if not names or (table.args.get("db") is None and names & ctes):
            continue  # a CTE's name
        if not table.find_ancestor(exp.Lock):  # FOR UPDATE OF t names no new read
            references.append(frozenset(names))
    written, unknown = _writes(tree, read)
    functions = {_function_name(f, read) for f in tree.find_all(exp.Func)}
    for column in tree.find_all(exp.Column):
        ident = column.this
        if column.table or not isinstance(ident, exp.Identifier) or ident.quoted:
            continue
        name = ident.this.lower()
        if name in _NILADIC or (name == "user" and read != "mysql"):
            functions.add(name)
    time_literal = any(
        lit.is_string and lit.this.strip().lower() in _TIME_WORDS
        for lit in tree.find_all(exp.Literal)
    )
    locks = list(tree.find_all(exp.Lock))
    locking = None
    if locks:
        locking = "FOR UPDATE" if any(lock.args.get("update") for lock in locks) else "FOR SHARE"
    return SqlFacts(
        understood=True,
        is_query=is_query,
        reads=frozenset().union(*references),
        references=tuple(references),
        writes=frozenset(written),
        writes_unknown=unknown,
        functions=frozenset(functions),
        time_literal=time_literal,
        locking=locking,
    )


def _writes(tree: exp.Expr, read: str | None) -> tuple[set[str], bool]:
    """Tables every DML/DDL node in the tree can write, and whether some target is unknown."""
    targets: list[exp.Table] = []
    unknown = False
    for node in tree.find_all(*_WRITERS, exp.Select):
        if isinstance(node, exp.Select):
            into = node.args.get("into")
            if into is not None:
                # SELECT … INTO creates a table (PostgreSQL) or sets variables (MySQL).
                found = _own_tables(into)
                targets += found
                unknown = unknown or not found
            continue
        if isinstance(node, (exp.Create, exp.Drop, _ALTER)):
            kind = str(node.args.get("kind") or "").upper()
            if kind not in _DDL_KINDS or (isinstance(node, exp.Drop) and "INDEX" in kind):
                unknown = True  # DROP INDEX ix, CREATE FUNCTION …: no table to name
                continue
        cascade = str(node.args.get("option")).upper() == "CASCADE"
        if isinstance(node, exp.TruncateTable) and cascade:
            # PostgreSQL's TRUNCATE … CASCADE empties every table with a foreign key to
            # it, whatever the key's actions: the tables are not named.
            unknown = True
        if isinstance(node.parent, exp.When):
            continue  # MERGE … WHEN MATCHED THEN UPDATE: writes the MERGE's target
        parts = [node.this, *(node.args.get("tables") or ()), *(node.expressions or ())]
        if isinstance(node, (exp.Update, exp.Merge, exp.Insert, exp.Create)):
            parts = [node.this]  # their expressions are SET items, not targets
        found = [t for part in parts if part is not None for t in _own_tables(part)]
        if isinstance(node, exp.Delete):
            found = _unalias(node, found)
        if not found:
            unknown = True
        targets += found
    names: set[str] = set()
    for table in targets:
        found_names = _table_names(table, read)
        unknown = unknown or not found_names  # SELECT … INTO @variable
        names |= found_names
    return names, unknown


def _unalias(node: exp.Expr, tables: list[exp.Table]) -> list[exp.Table]:
    """MySQL's ``DELETE u, a FROM users u JOIN addresses a``: the list names aliases."""
    aliases = {t.alias: t for t in node.find_all(exp.Table) if t.alias}
    return [
        aliases.get(t.name, t) if t.args.get("db") is None and not t.alias else t for t in tables
    ]


def _own_tables(node: exp.Expr) -> list[exp.Table]:
    """Tables named in a target clause (joins included), not inside its subqueries."""

    def prune(n: exp.Expr) -> bool:
        return n is not node and isinstance(n, (exp.Subquery, exp.Select))

    return [t for t in node.walk(prune=prune) if isinstance(t, exp.Table)]


def _variants(ident: object, read: str | None) -> set[str]:
    """The names an identifier can stand for: PostgreSQL folds unquoted names to lower
    case; elsewhere case sensitivity depends on the server's settings, so both."""
    if isinstance(ident, exp.TableAlias):
        ident = ident.this
    if not isinstance(ident, exp.Identifier):
        return set()
    name = str(ident.this)
    if read == "postgres":
        return {name if ident.quoted else name.lower()}
    return {name, name.lower()}


def _table_names(table: exp.Table, read: str | None) -> set[str]:
    """Every ``Table.fullname`` this reference may be: with and without its schema,
    since a table in the default schema (``public``, the current database) has none."""
    names = _variants(table.this, read)
    out = set(names)
    for schema in _variants(table.args.get("db"), read):
        out |= {f"{schema}.{n}" for n in names}
        for catalog in _variants(table.args.get("catalog"), read):
            out |= {f"{catalog}.{schema}.{n}" for n in names}
    return out


def _function_name(node: exp.Func, read: str | None) -> str:
    if not isinstance(node, exp.Anonymous):
        return node.sql_name().lower()
    name = str(node.name).lower()
    parent = node.parent
    if isinstance(parent, exp.Dot) and parent.expression is node:
        return f"{parent.this.sql(dialect=read).lower()}.{name}"
    return name


def _may_write(facts: SqlFacts, rules: FunctionRules | None) -> set[str]:
    """Tags the statement's function calls may write: declared tables, or everything."""
    out: set[str] = set()
    for name in facts.functions:
        kind = classify(name, rules)
        if kind == "unknown":
            return {NAMESPACE_TAG}
        if kind == "writes" and rules is not None:
            out |= {tag for table in rules.writes[name] for tag in (f"t:{table}", f"a:{table}")}
    return out


def text_write_tags(
    text: str, dialect: str | None = None, functions: FunctionRules | None = None
) -> set[str]:
    """Tags raw SQL may write: ``t:``/``a:`` of each table it writes, ``NAMESPACE_TAG``
    when it is not understood or calls a function that may write; empty only when the
    statement provably only reads."""
    facts = sql_facts(text, dialect)
    if not facts.understood or facts.writes_unknown:
        return {NAMESPACE_TAG}
    out = {tag for name in facts.writes for tag in (f"t:{name}", f"a:{name}")}
    return out | _may_write(facts, functions)


def text_is_read(
    text: str, dialect: str | None = None, functions: FunctionRules | None = None
) -> bool:
    """True only for one statement that provably only reads: a query with no DML in
    any CTE, no ``SELECT … INTO``, and no call of a function that may write."""
    facts = sql_facts(text, dialect)
    return facts.is_query and not text_write_tags(text, dialect, functions)


def text_read_tags(
    text: str, dialect: str | None = None, functions: FunctionRules | None = None
) -> set[str] | None:
    """``t:`` tags of every table a read names, or None when ``text`` is not a read."""
    if not text_is_read(text, dialect, functions):
        return None
    return {f"t:{name}" for name in sql_facts(text, dialect).reads}
