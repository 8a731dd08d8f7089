"""ormcache integrated into ihatemoney, a real Flask-SQLAlchemy application.

ihatemoney (https://github.com/spiral-project/ihatemoney, a shared-budget manager with
about 150 pytest tests; SQLAlchemy-Continuum keeps its history) is not vendored: this
module changes it at import time, the way its maintainers would edit ``models.py`` and
``run.py``, so that our repository holds only our own code.

The wiring is the README's Flask recipe, placed where the README puts it, in the
application factory: ``cache.init_app(app)`` then ``cache.attach(db.session)``. The factory
runs once per test, so this also checks that attaching again is a no-op and that one
``Cache`` serves many apps. ``ORMCACHE_URL`` and ``ORMCACHE_NAMESPACE`` come from the app's
default settings, which read them from the environment.

Cached read paths (:data:`READ_PATHS` lists them):

* ``FromCache`` on the queries the views build: the project lookup that every project
  page and API call makes, the bill queries behind the bill list, counts, searches,
  exports and the feed, member and bill lookups, and the history page's queries over
  SQLAlchemy-Continuum's version tables.
* ``memoize`` on the per-project computations: balances (the sidebar of every page, the
  statistics page and API, settlement), monthly statistics, currencies in use, the
  active months and the export. They take the project id, and read with column queries
  run inside the call, never from instances the request already holds: a value derived
  from the identity map could be older than the generations the call read.
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from flask import g
from sqlalchemy import distinct, func, select
from sqlalchemy.orm import aliased

from ormcache import Cache, FromCache

TTL = 300.0

#: What ``install()`` caches, for the summary: (kind, path, what uses it).
READ_PATHS: list[tuple[str, str, str]] = [
    ("FromCache", "ProjectQuery.get", "every project page, API auth, token checks"),
    ("FromCache", "Project.get_bills_unordered", "bill list, counts, search, export"),
    ("FromCache", "Project.get_bill_weights", "bill list page (paginated), RSS feed"),
    ("FromCache", "PersonQuery.get", "member edit, settle, API member"),
    ("FromCache", "PersonQuery.get_by_name", "bill forms and import"),
    ("FromCache", "PersonQuery.get_by_names", "CSV/JSON import"),
    ("FromCache", "PersonQuery.get_by_ids", "bill forms (owers)"),
    ("FromCache", "BillQuery.get", "bill edit/delete, API bill"),
    ("FromCache", "Person.has_bills", "member removal"),
    ("FromCache", "Bill.pay_each_default", "bill list (each share)"),
    ("FromCache", "history.get_history_queries", "history page (Continuum versions)"),
    ("memoize", "Project.full_balance", "balance sidebar, statistics, settle, API"),
    ("memoize", "Project.monthly_stats", "statistics page"),
    ("memoize", "Project.has_multiple_currencies", "project edit form, currency switch"),
    ("memoize", "Project.active_months_range", "statistics page"),
    ("memoize", "Project.get_pretty_bills", "export, import de-duplication"),
]


def _cached(query: Any) -> Any:
    return query.options(FromCache(ttl=TTL))


def _with_from_cache(build: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a function that returns a query so that the query is served from the cache."""

    @functools.wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _cached(build(*args, **kwargs))

    return wrapper


class _BillDates:
    """Stands in for a project in ``Project.active_months_range``: its oldest and
    newest bill, as the dates read by one query."""

    def __init__(self, oldest: Any, newest: Any) -> None:
        self._oldest = None if oldest is None else _Dated(oldest)
        self._newest = None if newest is None else _Dated(newest)

    def get_oldest_bill(self) -> Any:
        return self._oldest

    def get_newest_bill(self) -> Any:
        return self._newest


class _Dated:
    def __init__(self, date: Any) -> None:
        self.date = date


def install(cache: Cache) -> Cache:
    """Apply the integration to the imported ihatemoney modules, once per process, and
    return the cache it uses (the first one given)."""
    from ihatemoney import default_settings, history, models
    from ihatemoney import run as ihm_run

    installed = getattr(models, "_ormcache", None)
    if installed is not None:
        return installed  # type: ignore[no-any-return]
    models._ormcache = cache  # type: ignore[attr-defined]

    # -- configuration and wiring: the README's Flask recipe, in the factory -----------
    default_settings.ORMCACHE_URL = os.environ.get("ORMCACHE_URL", "memory://")  # type: ignore[attr-defined]
    default_settings.ORMCACHE_NAMESPACE = os.environ.get("ORMCACHE_NAMESPACE", "ihatemoney")  # type: ignore[attr-defined]
    create_app = ihm_run.create_app

    @functools.wraps(create_app)
    def create_app_with_cache(*args: Any, **kwargs: Any) -> Any:
        app = create_app(*args, **kwargs)
        cache.init_app(app)
        cache.attach(models.db.session)
        return app

    ihm_run.create_app = create_app_with_cache

    _install_queries(models, history)
    _install_memoized(cache, models)
    return cache


def _install_queries(models: Any, history: Any) -> None:
    Project, Person, Bill, billowers, db = (
        models.Project,
        models.Person,
        models.Bill,
        models.billowers,
        models.db,
    )

    def project_get(self: Any, ident: Any) -> Any:
        # Query.get is session.get: the identity map first, then one primary-key SELECT.
        return db.session.get(Project, ident, options=[FromCache(ttl=TTL)])

    Project.ProjectQuery.get = project_get
    Project.get_bills_unordered = _with_from_cache(Project.get_bills_unordered)
    Project.get_bill_weights = _with_from_cache(Project.get_bill_weights)

    def person_get(self: Any, id: Any, project: Any = None) -> Any:
        project = project or g.project
        query = Person.query.filter(Person.id == id, Person.project_id == project.id)
        return _cached(query).one_or_none()

    def person_get_by_name(self: Any, name: Any, project: Any) -> Any:
        query = Person.query.filter(Person.name == name, Person.project_id == project.id)
        return _cached(query).one_or_none()

    def person_get_by_names(self: Any, names: Any, project: Any) -> Any:
        query = Person.query.filter(Person.name.in_(names), Person.project_id == project.id)
        return _cached(query).all()

    def person_get_by_ids(self: Any, ids: Any, project: Any = None) -> Any:
        project = project or g.project
        query = Person.query.filter(Person.id.in_(ids), Person.project_id == project.id)
        return _cached(query).all()

    Person.PersonQuery.get = person_get
    Person.PersonQuery.get_by_name = person_get_by_name
    Person.PersonQuery.get_by_names = person_get_by_names
    Person.PersonQuery.get_by_ids = person_get_by_ids

    def bill_get(self: Any, project: Any, id: Any) -> Any:
        query = (
            Bill.query.join(Person, Bill.payer_id == Person.id)
            .filter(Person.project_id == project.id)
            .filter(Bill.id == id)
        )
        return _cached(query).one_or_none()

    Bill.BillQuery.get = bill_get

    def person_has_bills(self: Any) -> bool:
        owes = _cached(db.session.query(billowers).filter(billowers.c.person_id == self.id)).count()
        return owes != 0 or len(self.bills) != 0

    Person.has_bills = person_has_bills

    def bill_pay_each_default(self: Any, amount: float) -> float:
        if not self.owers:
            return 0
        weights = _cached(
            db.session.query(func.sum(Person.weight))
            .join(billowers)
            .join(Bill)
            .filter(Bill.id == self.id)
        ).scalar()
        return float(amount / weights)

    Bill.pay_each_default = bill_pay_each_default

    history_queries = history.get_history_queries

    @functools.wraps(history_queries)
    def cached_history_queries(project: Any) -> Any:
        return tuple(_cached(q) for q in history_queries(project))

    history.get_history_queries = cached_history_queries


def _install_memoized(cache: Cache, models: Any) -> None:
    Project, Person, Bill, BillType, billowers, db = (
        models.Project,
        models.Person,
        models.Bill,
        models.BillType,
        models.billowers,
        models.db,
    )

    def bills_with_shares(project_id: str) -> list[Any]:
        """Each bill with its owers and their weights, in one statement, so the balances
        are computed from one state of the database even at READ COMMITTED."""
        payer, ower = aliased(Person), aliased(Person)
        rows = db.session.execute(
            select(
                Bill.id, Bill.payer_id, Bill.bill_type, Bill.converted_amount, ower.id, ower.weight
            )
            .join(payer, Bill.payer_id == payer.id)
            .outerjoin(billowers, billowers.c.bill_id == Bill.id)
            .outerjoin(ower, billowers.c.person_id == ower.id)
            .where(payer.project_id == project_id)
            .order_by(Bill.id, ower.id)
        ).all()
        bills: dict[int, tuple[Any, Any, Any, list[tuple[int, float]]]] = {}
        for bill_id, payer_id, bill_type, converted, ower_id, weight in rows:
            shares = bills.setdefault(bill_id, (payer_id, bill_type, converted, []))[3]
            if ower_id is not None:
                shares.append((ower_id, weight))
        return list(bills.values())

    @cache.memoize(ttl=TTL)
    def project_full_balance(project_id: str) -> list[dict[int, float]]:
        """The five dicts of ``Project.full_balance``: balance, spent, paid,
        transferred, received (person id -> amount)."""
        balances, spent, paid, transferred, received = ({} for _ in range(5))
        for payer_id, bill_type, converted, shares in bills_with_shares(project_id):
            total_weight = sum(weight for _, weight in shares)
            if bill_type == BillType.EXPENSE:
                paid[payer_id] = paid.get(payer_id, 0.0) + converted
                into = spent
            elif bill_type == BillType.REIMBURSEMENT:
                transferred[payer_id] = transferred.get(payer_id, 0.0) + converted
                into = received
            else:
                continue
            for person_id, weight in shares:
                into[person_id] = into.get(person_id, 0.0) + weight * converted / total_weight
        members = db.session.scalars(select(Person.id).where(Person.project_id == project_id))
        for person_id in members:
            balances[person_id] = (
                paid.get(person_id, 0.0)
                - spent.get(person_id, 0.0)
                + transferred.get(person_id, 0.0)
                - received.get(person_id, 0.0)
            )
        return [balances, spent, paid, transferred, received]

    def full_balance(self: Any) -> tuple[defaultdict[int, float], ...]:
        return tuple(defaultdict(float, d) for d in project_full_balance(self.id))

    @cache.memoize(ttl=TTL)
    def project_monthly_stats(project_id: str) -> dict[int, dict[int, float]]:
        monthly: dict[int, dict[int, float]] = {}
        rows = db.session.execute(
            select(Bill.date, Bill.converted_amount)
            .join(Person, Bill.payer_id == Person.id)
            .where(Person.project_id == project_id, Bill.bill_type == BillType.EXPENSE)
            .order_by(Bill.id)
        )
        for date, converted in rows:
            months = monthly.setdefault(date.year, {})
            months[date.month] = months.get(date.month, 0.0) + converted
        return monthly

    def monthly_stats(self: Any) -> defaultdict[int, defaultdict[int, float]]:
        out: defaultdict[int, defaultdict[int, float]] = defaultdict(lambda: defaultdict(float))
        for year, months in project_monthly_stats(self.id).items():
            out[year].update(months)
        return out

    @cache.memoize(ttl=TTL)
    def project_currencies(project_id: str) -> list[str]:
        return sorted(
            db.session.scalars(
                select(distinct(Bill.original_currency))
                .join(Person, Bill.payer_id == Person.id)
                .where(Person.project_id == project_id)
            )
        )

    def has_multiple_currencies(self: Any) -> bool:
        return len(project_currencies(self.id)) > 1

    original_months_range = Project.active_months_range

    @cache.memoize(ttl=TTL)
    def project_months_range(project_id: str) -> list[Any]:
        # The original needs only the oldest and the newest bill date: read both here,
        # and let its own code build the range from them.
        oldest, newest = db.session.execute(
            select(func.min(Bill.date), func.max(Bill.date))
            .join(Person, Bill.payer_id == Person.id)
            .where(Person.project_id == project_id)
        ).one()
        return list(original_months_range(_BillDates(oldest, newest)))

    def active_months_range(self: Any) -> list[Any]:
        return project_months_range(self.id)

    original_pretty_bills = Project.get_pretty_bills

    @cache.memoize(ttl=TTL)
    def project_pretty_bills(project_id: str, export_format: str) -> list[dict[str, Any]]:
        # Every value comes from the queries the original runs (bills with their
        # owers, each payer), not from attributes loaded before the call.
        project = db.session.get(Project, project_id)
        return list(original_pretty_bills(project, export_format=export_format))

    def get_pretty_bills(self: Any, export_format: str = "json") -> list[dict[str, Any]]:
        return project_pretty_bills(self.id, export_format)

    Project.full_balance = property(full_balance)
    Project.monthly_stats = property(monthly_stats)
    Project.has_multiple_currencies = has_multiple_currencies
    Project.active_months_range = active_months_range
    Project.get_pretty_bills = get_pretty_bills
