"""Issue 10 §3: a memoized function is identified uniquely, the same way in every process.

Closures from one factory and lambdas used to share a ``__qualname__`` and return each
other's results (``get_order(1)`` returned a ``User``; ``square(5)`` returned 10), and a
memoized method raised a misleading ``TypeError``. Each spelling below gets entries of its
own, shares them when it is the same function, or is refused at decoration with an error
that says how to name it.
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import sessionmaker

from ormcache import Cache, ConfigurationError, UncacheableValueError
from tests.models import Address, User, seed


def make_getter(cache: Cache, model: type, session_factory: Any) -> Any:
    """One factory, one qualname (``make_getter.<locals>.get``) for every model."""

    @cache.memoize
    def get(pk: int) -> Any:
        with session_factory() as s:
            return s.get(model, pk)

    return get


def make_adder(cache: Cache, n: Any) -> Any:
    @cache.memoize
    def add(x: int) -> int:
        return x + n

    return add


def test_closures_from_one_factory_get_their_own_entries(cache: Cache, sqlite_engine: Any) -> None:
    """``get_order(1)`` returned a ``User``: the closures shared a key prefix."""
    Session_ = sessionmaker(sqlite_engine, expire_on_commit=False)
    cache.attach(Session_)
    seed(Session_)
    get_user = make_getter(cache, User, Session_)
    get_address = make_getter(cache, Address, Session_)
    assert isinstance(get_user(1), User)
    assert isinstance(get_address(1), Address)
    assert isinstance(get_user(1), User)
    assert isinstance(get_address(1), Address)
    assert cache.stats().hits == 2
    assert get_user.prefix != get_address.prefix
    assert get_user.prefix.startswith(f"m:{__name__}.make_getter.<locals>.get~")

    add1, add2 = make_adder(cache, 1), make_adder(cache, 2)
    assert (add1(5), add2(5), add1(5), add2(5)) == (6, 7, 6, 7)


def test_the_prefix_is_the_same_in_another_process(cache: Cache) -> None:
    """Two workers share entries for the same function: no ``id()`` in the prefix."""
    here = make_adder(cache, 41).prefix
    code = (
        "from ormcache import Cache; from tests.test_memoize_identity import make_adder; "
        "print(make_adder(Cache(), 41).prefix)"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert there == here


def test_closures_over_values_without_a_stable_description_are_refused(cache: Cache) -> None:
    """Two factories' closures over plain objects cannot be told apart across processes:
    the second is refused at decoration, and a distinct ``name=`` resolves it."""

    class Tenant:
        def __init__(self, rate: int) -> None:
            self.rate = rate

    def make(tenant: Tenant, name: str | None = None) -> Any:
        @cache.memoize(name=name)
        def price(x: int) -> int:
            return x * tenant.rate

        return price

    make(Tenant(2))
    with pytest.raises(ConfigurationError, match=r"closure variable 'tenant'.*name="):
        make(Tenant(3))
    p2, p3 = make(Tenant(2), name="price_2"), make(Tenant(3), name="price_3")
    assert (p2(10), p3(10), p2(10), p3(10)) == (20, 30, 20, 30)


def test_the_same_function_decorated_again_shares_entries(cache: Cache) -> None:
    """An application factory that runs twice memoizes the same code over equal values
    (a fresh helper and session factory each time): allowed, and the entries are shared."""
    calls: list[int] = []

    def create_app() -> Any:
        def helper(x: int) -> int:
            calls.append(x)
            return x * 3

        session_factory = sessionmaker()

        @cache.memoize
        def triple(x: int) -> int:
            assert session_factory is not None  # closed over, as an app's session would be
            return helper(x)

        return triple

    first, second = create_app(), create_app()
    assert first.prefix == second.prefix
    assert first(2) == second(2) == 6
    assert calls == [2]

    def plain(x: int) -> int:
        calls.append(x)
        return x

    a, b = cache.memoize(plain), cache.memoize(plain)
    assert a(9) == b(9) == 9
    assert calls == [2, 9]


def test_a_reloaded_module_shares_entries(
    cache: Cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = textwrap.dedent(
        """
        CALLS = []

        def install(cache):
            @cache.memoize
            def lookup(x):
                CALLS.append(x)
                return x + 100
            return lookup
        """
    )
    (tmp_path / "reloadme_oc.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("reloadme_oc")
    try:
        assert module.install(cache)(1) == 101
        module = importlib.reload(module)
        assert module.install(cache)(1) == 101
        assert module.CALLS == []  # served from the entry the first module stored
    finally:
        sys.modules.pop("reloadme_oc", None)


def test_lambdas_need_a_name(cache: Cache) -> None:
    """``square(5)`` returned 10: every lambda was ``<lambda>``."""
    with pytest.raises(ConfigurationError, match=r"lambda.*name="):
        cache.memoize(lambda x: x * x)
    square = cache.memoize(name="square")(lambda x: x * x)
    double = cache.memoize(name="double")(lambda x: x * 2)
    assert (square(5), double(5), square(5), double(5)) == (25, 10, 25, 10)
    assert cache.stats().hits == 2
    with pytest.raises(ConfigurationError, match="share the key prefix"):
        cache.memoize(name="square")(lambda x: x**3)


def test_nested_functions_of_different_scopes_are_distinct(cache: Cache) -> None:
    def outer_a() -> Any:
        @cache.memoize
        def inner(x: int) -> str:
            return f"a{x}"

        return inner

    def outer_b() -> Any:
        @cache.memoize
        def inner(x: int) -> str:
            return f"b{x}"

        return inner

    a, b = outer_a(), outer_b()
    assert (a(1), b(1), a(1), b(1)) == ("a1", "b1", "a1", "b1")


def test_version_separates_but_never_shares_a_prefix_between_functions(cache: Cache) -> None:
    def first(x: int) -> int:
        return 1

    v1 = cache.memoize(version=1)(first)
    v2 = cache.memoize(version=2)(first)
    assert v1.prefix != v2.prefix


def test_partials_are_keyed_by_their_bound_arguments(cache: Cache) -> None:
    def power(base: int, exp: int) -> int:
        return base**exp

    two = cache.memoize(functools.partial(power, 2))
    three = cache.memoize(functools.partial(power, 3))
    assert (two(5), three(5), two(5), three(5)) == (32, 243, 32, 243)
    assert cache.stats().hits == 2
    with pytest.raises(ConfigurationError, match="lambda"):
        cache.memoize(functools.partial(lambda a, b: a + b, 1))

    class Opaque:
        pass

    def scale(factor: Any, x: int, y: int = 0) -> int:
        return x

    cache.memoize(functools.partial(scale, Opaque()))
    with pytest.raises(ConfigurationError, match="name="):
        cache.memoize(functools.partial(scale, Opaque()))
    with pytest.raises(ConfigurationError, match="other bound arguments"):
        cache.memoize(functools.partial(scale, Opaque(), y=1))


class Account:
    """A plain class with memoized methods in each spelling."""

    rate = 2

    def __init__(self, owner: str) -> None:
        self.owner = owner

    def __repr__(self) -> str:
        return f"Account({self.owner!r})"


def test_methods_key_self_or_say_to_ignore_it(cache: Cache) -> None:
    """A memoized method binds like a method; ``self`` must be keyable or ignored, and the
    error for an unkeyable one names ``ignore=("self",)`` (it was a bare TypeError)."""

    class Plain(Account):
        @cache.memoize
        def greet(self, name: str) -> str:
            return f"{self.owner} greets {name}"

    with pytest.raises(UncacheableValueError, match=r'ignore=\("self",\)'):
        Plain("ann").greet("bob")

    calls: list[str] = []

    class Ignoring(Account):
        @cache.memoize(ignore=("self",))
        def shout(self, word: str) -> str:
            calls.append(word)
            return word.upper()

    acct = Ignoring("ann")
    assert acct.shout("hi") == Ignoring("bea").shout("hi") == "HI"
    assert calls == ["hi"]
    acct.shout.invalidate("hi")
    assert acct.shout("hi") == "HI"
    assert calls == ["hi", "hi"]


def test_orm_instances_as_self_or_argument_are_keyed_by_identity(
    cache: Cache, sqlite_engine: Any
) -> None:
    """A method's ``self`` is an argument like any other: an ORM instance is keyed by its
    identity, so each row has its own entry."""
    Session_ = sessionmaker(sqlite_engine, expire_on_commit=False)
    seed(Session_)
    cache.attach(Session_)

    def cities(self: User) -> list[str]:
        return [a.city for a in self.addresses]

    cities_of: Any = cache.memoize(cities)
    bound = cities_of.__get__(None, User), cities_of
    assert bound[0] is cities_of
    with Session_() as s:
        u1, u2 = s.get(User, 1), s.get(User, 2)
        assert cities_of.__get__(u1, User)() == ["city0a", "city0b"]
        assert cities_of.__get__(u2, User)() == ["city1a", "city1b"]
        assert cities_of.__get__(u1, User)() == ["city0a", "city0b"]
    assert cities_of.cache_key(u1) != cities_of.cache_key(u2)
    assert cities_of.__get__(u1, User).cache_key() == cities_of.cache_key(u1)


@pytest.mark.parametrize("outer", ["memoize", "classmethod"])
def test_classmethods_are_keyed_by_class(cache: Cache, outer: str) -> None:
    """``cls`` is keyed by the class's qualified name, so a subclass has its own entries;
    ``@cache.memoize`` goes above or below ``@classmethod``."""
    calls: list[str] = []

    def body(cls: type[Account], x: int) -> str:
        calls.append(cls.__name__)
        return f"{cls.__name__}:{x * cls.rate}"

    if outer == "memoize":
        wrapped: Any = cache.memoize(classmethod(body))
    else:
        wrapped = classmethod(cache.memoize(body))  # type: ignore[arg-type]

    class Base(Account):
        rate = 2
        describe = wrapped

    class Sub(Base):
        rate = 10

    assert Base.describe(3) == "Base:6"
    assert Sub.describe(3) == "Sub:30"
    assert Base("x").describe(3) == "Base:6"
    assert Sub.describe(3) == "Sub:30"
    assert calls == ["Base", "Sub"]
    Sub.describe.invalidate(3)
    assert Sub.describe(3) == "Sub:30"
    assert calls == ["Base", "Sub", "Sub"]


@pytest.mark.parametrize("outer", ["memoize", "staticmethod"])
def test_staticmethods_work_in_either_order(cache: Cache, outer: str) -> None:
    calls: list[int] = []

    def body(x: int) -> int:
        calls.append(x)
        return x + 1

    wrapped: Any = (
        cache.memoize(staticmethod(body))
        if outer == "memoize"
        else staticmethod(cache.memoize(body))
    )

    class Holder:
        bump = wrapped

    assert Holder.bump(1) == Holder().bump(1) == 2
    assert calls == [1]
    Holder.bump.invalidate(1)
    assert Holder.bump(1) == 2
    assert calls == [1, 1]


def test_bound_methods_and_callable_objects(cache: Cache) -> None:
    class Scaler:
        def __init__(self, k: int) -> None:
            self.k = k

        def scale(self, x: int) -> int:
            return x * self.k

        def __call__(self, x: int) -> int:
            return x * self.k

    s2, s3 = Scaler(2), Scaler(3)
    cache.memoize(s2.scale)
    with pytest.raises(ConfigurationError, match=r"__self__.*name="):
        cache.memoize(s3.scale)
    with pytest.raises(ConfigurationError, match="name="):
        cache.memoize(s2)
    by3 = cache.memoize(name="by3")(s3)
    assert by3(2) == by3(2) == 6


def test_functions_that_differ_in_default_values_are_keyed_apart(cache: Cache) -> None:
    """Every call is keyed with its defaults applied, so the prefix stays readable and
    the two never share an entry."""

    def make(rate: int) -> Any:
        def price(x: int, rate: int = rate) -> int:
            return x * rate

        return price

    two, three = cache.memoize(make(2)), cache.memoize(make(3))
    assert two.prefix == three.prefix == f"m:{__name__}.{make.__qualname__}.<locals>.price"
    assert (two(5), three(5), two(5), three(5)) == (10, 15, 10, 15)
