"""The snapshot codec: exact round trips, and hostile bytes are only ever a miss."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import enum
import math
import os
import pickle
import uuid
import zoneinfo
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Interval,
    LargeBinary,
    Numeric,
    String,
    Uuid,
    create_engine,
    inspect,
    select,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
)
from sqlalchemy.orm.exc import DetachedInstanceError

from ormcache import UncacheableValueError, as_dict
from ormcache.codec import Codec
from ormcache.errors import CorruptPayloadError
from tests.support.threads import run_threads

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


# -- values ---------------------------------------------------------------------------
def same(a: Any, b: Any) -> bool:
    """Equal value *and* equal types, recursively (NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (dt.datetime, dt.time)):
        return a == b and a.tzinfo == b.tzinfo and a.fold == b.fold and str(a) == str(b)
    return bool(a == b)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.binary(),
    st.datetimes(),
    st.datetimes(timezones=st.timezones()),
    st.datetimes(
        timezones=st.builds(
            dt.timezone,
            st.timedeltas(min_value=dt.timedelta(hours=-23), max_value=dt.timedelta(hours=23)),
        )
    ),
    st.dates(),
    st.times(),
    st.times(timezones=st.just(dt.timezone.utc)),
    st.timedeltas(),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.uuids(),
    st.sampled_from(list(Colour) + list(Level)),
)
hashables = st.one_of(st.integers(), st.text(), st.binary(), st.uuids(), st.booleans())
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.lists(children, max_size=5).map(tuple),
        st.dictionaries(st.one_of(st.text(), st.integers()), children, max_size=5),
        st.sets(hashables, max_size=5),
        st.frozensets(hashables, max_size=5),
    ),
    max_leaves=20,
)


@FAST
@given(values)
def test_round_trip_preserves_values_and_types(value: Any) -> None:
    """decode(encode(v)) is v, with every type preserved (tuples stay tuples, ...)."""
    codec = Codec()
    assert same(codec.decode(codec.encode(value)), value)


@FAST
@given(values)
def test_signed_round_trip(value: Any) -> None:
    codec = Codec(secret=b"k" * 32)
    assert same(codec.decode(codec.encode(value)), value)


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_are_only_a_miss(data: bytes) -> None:
    """Arbitrary bytes never raise anything but CorruptPayloadError."""
    codec = Codec()
    with contextlib.suppress(CorruptPayloadError):
        codec.decode(data)


@FAST
@given(values, st.data())
def test_truncated_and_flipped_payloads_are_only_a_miss(value: Any, data: st.DataObject) -> None:
    """Every truncation and a random bit flip of a valid payload decode or miss, never crash."""
    codec = Codec()
    payload = codec.encode(value)
    cut = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    with pytest.raises(CorruptPayloadError):
        codec.decode(payload[:cut])
    pos = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    flipped = bytearray(payload)
    flipped[pos] ^= 1 << bit
    with contextlib.suppress(CorruptPayloadError):
        codec.decode(bytes(flipped))


@FAST
@given(st.binary(max_size=200))
def test_hostile_bytes_behind_a_valid_header_are_only_a_miss(body: bytes) -> None:
    codec = Codec()
    with contextlib.suppress(CorruptPayloadError):
        codec.decode(b"OC\x01\x00" + body)


def test_deep_nesting_is_a_miss_not_a_crash() -> None:
    codec = Codec()
    nested = b"OC\x01\x00" + b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(CorruptPayloadError):
        codec.decode(nested)


class _Canary:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickle_is_never_executed(tmp_path: Any) -> None:
    """A pickle that would create a file is rejected by the magic check; no file appears."""
    canary = str(tmp_path / "pwned")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(CorruptPayloadError):
            Codec().decode(pickle.dumps(_Canary(canary), protocol=protocol))
    assert not os.path.exists(canary)


def test_signature_checks() -> None:
    """Tampering, a wrong secret and a signed/unsigned mismatch are all misses."""
    signed = Codec(secret=b"s1")
    payload = signed.encode({"a": 1})
    tampered = bytearray(payload)
    tampered[-1] ^= 1
    for codec, data in [
        (signed, bytes(tampered)),
        (Codec(secret=b"s2"), payload),
        (Codec(), payload),
        (signed, Codec().encode({"a": 1})),
    ]:
        with pytest.raises(CorruptPayloadError):
            codec.decode(data)


def test_unknown_enum_and_custom_type_are_misses() -> None:
    class Temp(enum.Enum):
        A = 1

    writer, reader = Codec(), Codec()
    with pytest.raises(CorruptPayloadError):
        reader.decode(writer.encode(Temp.A))

    class Money:
        def __init__(self, cents: int) -> None:
            self.cents = cents

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Money) and other.cents == self.cents

    writer.register_type(Money, name="money", encode=lambda m: m.cents, decode=Money)
    payload = writer.encode([Money(5)])
    assert writer.decode(payload) == [Money(5)]
    with pytest.raises(CorruptPayloadError):
        reader.decode(payload)


def test_uncacheable_values_name_the_path_and_fix() -> None:
    from collections import OrderedDict

    codec = Codec()
    cases: list[tuple[Any, str, str]] = [
        ({"a": [1, object()]}, "value['a'][1]", "register_type"),
        (OrderedDict(a=1), "value", "dict(...)"),
        ([bytearray(b"x")], "value[0]", "bytes(...)"),
    ]
    for value, path, fix in cases:
        with pytest.raises(UncacheableValueError) as info:
            codec.encode(value)
        assert info.value.path == path
        assert fix in str(info.value)


def test_canonical_is_order_independent_and_type_aware() -> None:
    codec = Codec()
    assert codec.canonical(({"a": 1, "b": 2},)) == codec.canonical(({"b": 2, "a": 1},))
    assert codec.canonical(({1, 2, 3},)) == codec.canonical(({3, 2, 1},))
    assert codec.canonical((1,)) != codec.canonical((1.0,))
    assert codec.canonical((1,)) != codec.canonical((True,))
    assert codec.canonical(([1],)) != codec.canonical(((1,),))
    assert codec.canonical((2**70,)) != codec.canonical((2**70 + 1,))


# -- ORM instances --------------------------------------------------------------------
class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "codec_accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    balance: Mapped[decimal.Decimal] = mapped_column(Numeric(12, 4))
    ident: Mapped[uuid.UUID] = mapped_column(Uuid)
    colour: Mapped[Colour] = mapped_column(SAEnum(Colour))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    period: Mapped[dt.timedelta] = mapped_column(Interval)
    notes: Mapped[str | None] = mapped_column(String(50), deferred=True)
    lines: Mapped[list[Line]] = relationship(back_populates="account", order_by="Line.id")


class Line(Base):
    __tablename__ = "codec_lines"

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("codec_accounts.id"))
    text: Mapped[str] = mapped_column(String(50))
    account: Mapped[Account] = relationship(back_populates="lines")


class Employee(Base):
    __tablename__ = "codec_employees"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(50))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Manager(Employee):
    """Single-table inheritance."""

    team: Mapped[str | None] = mapped_column(String(50), nullable=True)
    __mapper_args__ = {"polymorphic_identity": "manager"}


class Engineer(Employee):
    """Joined-table inheritance."""

    __tablename__ = "codec_engineers"
    id: Mapped[int] = mapped_column(ForeignKey("codec_employees.id"), primary_key=True)
    language: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_identity": "engineer"}


class Pair(Base):
    """Composite primary key."""

    __tablename__ = "codec_pairs"

    left: Mapped[str] = mapped_column(String(10), primary_key=True)
    right: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(20))
    children: Mapped[list[PairChild]] = relationship()


class PairChild(Base):
    __tablename__ = "codec_pair_children"

    id: Mapped[int] = mapped_column(primary_key=True)
    left: Mapped[str] = mapped_column(String(10))
    right: Mapped[int] = mapped_column()
    __table_args__ = (
        ForeignKeyConstraint(["left", "right"], ["codec_pairs.left", "codec_pairs.right"]),
    )


@pytest.fixture
def session() -> Any:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        account = Account(
            id=1,
            name="a",
            created_at=dt.datetime(2024, 3, 4, 5, 6, 7, 890, tzinfo=dt.timezone.utc),
            balance=decimal.Decimal("12.3400"),
            ident=uuid.UUID(int=42),
            colour=Colour.GREEN,
            data={"k": [1, 2, {"x": None}]},
            blob=b"\x00\x01",
            period=dt.timedelta(days=2, seconds=5),
            notes="deferred",
            lines=[Line(id=1, text="one"), Line(id=2, text="two")],
        )
        s.add_all(
            [
                account,
                Manager(id=1, name="m", team="t"),
                Engineer(id=2, name="e", language="py"),
                Pair(left="x", right=1, label="p", children=[PairChild(id=1)]),
            ]
        )
        s.commit()
    with Session(engine) as s:
        yield s
    engine.dispose()


COLUMNS = ("id", "name", "created_at", "balance", "ident", "colour", "data", "blob", "period")


def test_instance_round_trip_equals_database_read(session: Session) -> None:
    """A decoded instance has the same loaded attributes, with the same types, as the
    fresh database read it was encoded from; it is detached, and unloaded attributes
    behave as on a detached SQLAlchemy object."""
    codec = Codec()
    account = session.scalars(select(Account).options(selectinload(Account.lines))).one()
    decoded = codec.decode(codec.encode(account))
    assert type(decoded) is Account
    for col in COLUMNS:
        assert same(getattr(decoded, col), getattr(account, col)), col
    state = inspect(decoded)
    assert state.detached
    assert state.key == inspect(account).key
    assert [line.text for line in decoded.lines] == ["one", "two"]
    with pytest.raises(DetachedInstanceError):
        _ = decoded.notes  # deferred and never loaded


def test_cycles_and_shared_references_survive(session: Session) -> None:
    codec = Codec()
    account = session.scalars(select(Account)).one()
    for line in account.lines:
        assert line.account is account
    decoded = codec.decode(codec.encode(account.lines))
    assert decoded[0].account is decoded[1].account
    assert decoded[0] in decoded[0].account.lines


def test_inheritance_and_composite_keys(session: Session) -> None:
    codec = Codec()
    people = session.scalars(select(Employee).order_by(Employee.id)).all()
    decoded = codec.decode(codec.encode(list(people)))
    assert [type(p) for p in decoded] == [Manager, Engineer]
    assert [p.name for p in decoded] == ["m", "e"]
    with pytest.raises(DetachedInstanceError):
        _ = decoded[0].team  # not loaded by a base-class query: not invented either
    manager = session.scalars(select(Manager)).one()
    engineer = session.scalars(select(Engineer)).one()
    back = codec.decode(codec.encode([manager, engineer]))
    assert back[0].team == "t"
    assert back[1].language == "py"
    pair = session.scalars(select(Pair).options(selectinload(Pair.children))).one()
    pair_back = codec.decode(codec.encode(pair))
    assert inspect(pair_back).key == inspect(pair).key
    assert pair_back.children[0].id == 1


def test_rows_round_trip(session: Session) -> None:
    codec = Codec()
    rows = session.execute(select(Account.id, Account.name, Account.balance)).all()
    decoded = codec.decode(codec.encode(rows))
    assert decoded == rows
    assert decoded[0]._fields == rows[0]._fields
    assert decoded[0].name == "a"
    mixed = session.execute(select(Account, Account.name)).one()
    back = codec.decode(codec.encode(mixed))
    assert back[0].id == 1
    assert back.name == "a"


def test_decoded_instances_merge_into_a_session(session: Session) -> None:
    codec = Codec()
    account = session.scalars(select(Account)).one()
    decoded = codec.decode(codec.encode(account))
    session.expunge_all()
    merged = session.merge(decoded, load=False)
    assert merged.name == "a"
    assert merged in session


def test_repeated_decodes_share_nothing_mutable(session: Session) -> None:
    """Decoding the same bytes again is served from a parsed copy kept by the codec; a
    caller that mutates what it got (a JSON dict, a list inside it, a relationship
    list) must not change what the next decode of those bytes returns."""
    codec = Codec()
    account = session.scalars(select(Account).options(selectinload(Account.lines))).one()
    payload = codec.encode([account, {"plain": [1, 2]}])
    first = codec.decode(payload)
    first[0].data["k"].append("mutated")
    first[0].data["new"] = 1
    first[0].lines.pop()
    first[1]["plain"].append(3)
    for _ in range(2):
        again = codec.decode(payload)
        assert again[0].data == {"k": [1, 2, {"x": None}]}
        assert [line.text for line in again[0].lines] == ["one", "two"]
        assert again[1] == {"plain": [1, 2]}
        assert again[0] is not first[0]
        again[0].data["k"].clear()


def test_concurrent_decodes_of_one_payload_stay_independent(session: Session) -> None:
    """Threads decoding the same bytes share the codec's parsed copy: each must get its
    own objects, equal to the original, while others mutate theirs and the parsed copy
    is dropped and rebuilt underneath them."""
    import threading

    codec = Codec()
    account = session.scalars(select(Account).options(selectinload(Account.lines))).one()
    payload = codec.encode(account)
    start = threading.Barrier(4)

    def work(n: int) -> None:
        start.wait()
        for i in range(300):
            got = codec.decode(payload)
            assert got.data == {"k": [1, 2, {"x": None}]}, got.data
            assert [line.text for line in got.lines] == ["one", "two"]
            got.data["k"].append(n)
            got.data["k"][2]["x"] = n
            got.lines.pop()
            if n == 0 and i % 10 == 0:
                codec.parsed.clear()

    run_threads(work, 4)


def test_decode_into_reuses_held_identities_and_fills_only_gaps(session: Session) -> None:
    """With ``into``, an identity the session already holds is used as it is, keeping its
    loaded and pending values, as a database load would; others are built and
    registered."""
    codec = Codec()
    account = session.scalars(select(Account).options(selectinload(Account.lines))).one()
    payload = codec.encode(account)
    session.expunge_all()
    held = session.get(Account, 1)
    assert held is not None
    held.name = "pending"
    session.expire(held, ["balance"])
    registered: list[object] = []

    class Into:
        def existing(self, key: tuple[Any, ...]) -> object | None:
            return session.identity_map.get(key)

        def register(self, state: Any, key: tuple[Any, ...], obj: object) -> None:
            registered.append(obj)

    back = codec.decode(payload, into=Into())
    assert back is held
    assert held.name == "pending"  # pending change kept
    assert held.balance == decimal.Decimal("12.3400")  # expired attribute filled
    assert [line.text for line in held.lines] == ["one", "two"]
    assert sorted(type(o).__name__ for o in registered) == ["Line", "Line"]


def test_one_identity_twice_is_a_miss(session: Session) -> None:
    """A hostile payload naming one identity twice must not register two objects."""
    codec = Codec()
    account = session.scalars(select(Account)).one()
    payload = codec.encode(account)
    body = msgpack.unpackb(payload[4:], raw=False, strict_map_key=False, ext_hook=msgpack.ExtType)
    mappers, instances, _ = body
    forged = MAGIC_HEADER + msgpack.packb(
        [mappers, [instances[0], instances[0]], [msgpack.ExtType(13, (0).to_bytes(4, "big"))]],
        use_bin_type=True,
    )

    registered: list[object] = []

    class Into:
        def existing(self, key: tuple[Any, ...]) -> object | None:
            return None

        def register(self, state: Any, key: tuple[Any, ...], obj: object) -> None:
            registered.append(obj)

    with pytest.raises(CorruptPayloadError):
        codec.decode(forged, into=Into())
    assert registered == []


MAGIC_HEADER = b"OC\x01\x00"


def test_mapper_index_outside_the_payload_is_a_miss(session: Session) -> None:
    """An instance must name one of the payload's own mappers: -1 is not "the last"."""
    codec = Codec()
    payload = codec.encode(session.scalars(select(Account)).one())
    mappers, instances, root = msgpack.unpackb(
        payload[4:], raw=False, strict_map_key=False, ext_hook=msgpack.ExtType
    )
    assert len(mappers) == 1
    for bad in (-1, 1, "0", None):
        forged_instances = [list(i) for i in instances]
        forged_instances[0][0] = bad
        forged = MAGIC_HEADER + msgpack.packb([mappers, forged_instances, root], use_bin_type=True)
        with pytest.raises(CorruptPayloadError):
            codec.decode(forged)


def test_relationship_references_outside_the_payload_are_a_miss(session: Session) -> None:
    """A relationship naming an instance index the payload does not hold, or of the
    wrong shape, is refused when the payload is parsed."""
    codec = Codec()
    account = session.scalars(select(Account).options(selectinload(Account.lines))).one()
    payload = codec.encode(account)
    mappers, instances, root = msgpack.unpackb(
        payload[4:], raw=False, strict_map_key=False, ext_hook=msgpack.ExtType
    )
    assert codec.decode(payload).lines  # the genuine payload decodes
    lines_at = next(i for i, inst in enumerate(instances) if "lines" in inst[3])
    for bad in ([99], [-1], "x", [0.5], 7):
        forged_instances = [list(i) for i in instances]
        forged_instances[lines_at][3] = {"lines": bad}
        forged = MAGIC_HEADER + msgpack.packb([mappers, forged_instances, root], use_bin_type=True)
        with pytest.raises(CorruptPayloadError):
            codec.decode(forged)


def test_schema_change_and_unknown_mapper_are_misses(session: Session) -> None:
    codec = Codec()
    account = session.scalars(select(Account)).one()
    payload = codec.encode(account)
    info = codec.mapper_info(inspect(Account))
    original = info.fingerprint
    info.fingerprint = b"\x00" * 8
    try:
        with pytest.raises(CorruptPayloadError, match="schema"):
            codec.decode(payload)
    finally:
        info.fingerprint = original
    forged = payload.replace(info.key.encode(), info.key.encode()[:-1] + b"X")
    with pytest.raises(CorruptPayloadError):
        Codec().decode(forged)


def test_a_fresh_codec_finds_mappers_without_importing(session: Session) -> None:
    """Another process has not encoded the class yet: it is found in SQLAlchemy's
    registries by key, never imported."""
    payload = Codec().encode(session.scalars(select(Account)).one())
    assert Codec().decode(payload).name == "a"  # type: ignore[attr-defined]


def test_seed_dict_is_refused_and_as_dict_is_fine(session: Session) -> None:
    """The seed's ``user.__dict__`` carries ``_sa_instance_state``: refused with the fix."""
    codec = Codec()
    account = session.scalars(select(Account)).one()
    with pytest.raises(UncacheableValueError) as info:
        codec.encode(account.__dict__)
    assert info.value.path == "value['_sa_instance_state']"
    assert "return the object or ormcache.as_dict(obj)" in str(info.value)
    plain = as_dict(account)
    assert "_sa_instance_state" not in plain
    assert "notes" not in plain  # deferred and unloaded: skipped, no surprise SQL
    assert same(codec.decode(codec.encode(plain)), plain)


def test_zoneinfo_and_fold_round_trip() -> None:
    codec = Codec()
    tz = zoneinfo.ZoneInfo("Europe/Berlin")
    ambiguous = dt.datetime(2023, 10, 29, 2, 30, tzinfo=tz, fold=1)
    assert same(codec.decode(codec.encode(ambiguous)), ambiguous)
    named = dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=2), "EET"))
    assert same(codec.decode(codec.encode(named)), named)


def test_a_failed_pack_leaves_nothing_behind_for_the_next() -> None:
    """Packing reuses one msgpack Packer per thread: a value it refuses must not leave
    bytes in its buffer that end up in the next payload."""
    from ormcache.codec.wire import pack

    with pytest.raises(TypeError):
        pack([1, object()])
    assert msgpack.unpackb(pack([2, "b"])) == [2, "b"]


def test_key_hashes_are_plain_blake2b() -> None:
    """Key names are part of the stored format: the reused hasher must give exactly the
    BLAKE2b-128 of the bytes (keyed by the salt when there is one)."""
    import hashlib

    from ormcache.keys import hash_bytes

    for data in (b"", b"abc", bytes(range(256)) * 40):
        assert hash_bytes(data) == hashlib.blake2b(data, digest_size=16).hexdigest()
        assert (
            hash_bytes(data, b"k" * 32)
            == hashlib.blake2b(data, digest_size=16, key=b"k" * 32).hexdigest()
        )


# -- issue 12: what the codec cannot pack, and hostile nesting --------------------------
def nested(depth: int, leaf: Any = 1, wrap: Any = lambda v: [v]) -> Any:
    value = leaf
    for _ in range(depth):
        value = wrap(value)
    return value


lone_surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
bad_text = st.builds(lambda a, s, b: a + s + b, st.text(max_size=3), lone_surrogates, st.text())
# A value with text UTF-8 cannot encode somewhere inside: as a value, a key, in a tuple...
with_bad_text = st.recursive(
    st.one_of(bad_text, bad_text.map(lambda k: {k: 1})),
    lambda inner: st.one_of(
        st.tuples(st.lists(values, max_size=2), inner).map(lambda t: [*t[0], t[1]]),
        inner.map(lambda x: (x,)),
        st.tuples(st.text(), inner, st.dictionaries(st.text(), values, max_size=2)).map(
            lambda t: {**t[2], t[0]: t[1]}
        ),
        st.tuples(st.sampled_from(["k"]), inner).map(lambda t: {"k": t[1], "ok": t[0]}),
    ),
    max_leaves=6,
)


@FAST
@given(with_bad_text)
def test_text_utf8_cannot_encode_is_uncacheable_not_a_unicode_error(value: Any) -> None:
    """Issue 12: a lone surrogate anywhere (value, key, tuple item) used to escape as
    UnicodeEncodeError; it is an UncacheableValueError naming where it sits, for payloads
    and for key arguments alike."""
    codec = Codec()
    for encode in (codec.encode, lambda v: codec.canonical((v,))):
        with pytest.raises(UncacheableValueError) as info:
            encode(value)
        assert info.value.path.startswith("value")
        assert "UTF-8 cannot encode" in str(info.value)


def test_bad_text_names_its_path() -> None:
    codec = Codec()
    cases: list[tuple[Any, str]] = [
        ("\ud800", "value"),
        ({"a": [1, "x\udfff"]}, "value['a'][1]"),
        ({"\ud800": 1}, "value['\\ud800']"),
        ([(1, "\ud800")], "value[0][1]"),
        (Colour.RED, None),  # fine: a control
    ]
    for value, path in cases:
        if path is None:
            codec.encode(value)
            continue
        with pytest.raises(UncacheableValueError) as info:
            codec.encode(value)
        assert info.value.path == path
    with pytest.raises(UncacheableValueError) as info:
        codec.canonical(("ok", "\ud800"))  # the scalar short form
    assert info.value.path == "value[1]"


def test_bad_text_in_an_instance_names_the_attribute() -> None:
    """The text can also sit in a mapped instance's column (a pending object here)."""
    account = Account(id=9, name="bad\ud800")
    with pytest.raises(UncacheableValueError) as info:
        Codec().encode([account])
    assert info.value.path == "value[0].name"


def test_nesting_beyond_the_format_is_uncacheable() -> None:
    """Issue 12: results nested about 600 deep used to escape as RecursionError. Up to
    MAX_DEPTH levels (a tuple, set, ... counting EXT_LEVEL) round-trip; deeper is an
    UncacheableValueError naming the path, for payloads and key arguments."""
    from ormcache.codec.wire import EXT_LEVEL, MAX_DEPTH, MAX_EXT_DEPTH

    codec = Codec()
    zoned = dt.datetime(2024, 3, 31, 2, 30, tzinfo=zoneinfo.ZoneInfo("Europe/Berlin"))
    fine = [
        nested(MAX_DEPTH),
        nested(MAX_DEPTH, wrap=lambda v: {"k": v}),
        nested(MAX_EXT_DEPTH, zoned, wrap=lambda v: (v,)),
        nested(MAX_EXT_DEPTH, 1, wrap=lambda v: frozenset([v])),
        nested(MAX_DEPTH - 8 * EXT_LEVEL, nested(8, wrap=lambda v: (v,))),
    ]
    for value in fine:
        assert same(codec.decode(codec.encode(value)), value)
        codec.canonical((value,))  # the arguments' own tuple does not count
    too_deep = [
        nested(MAX_DEPTH + 1),
        nested(600),
        nested(600, wrap=lambda v: {"k": v}),
        nested(MAX_EXT_DEPTH + 1, wrap=lambda v: (v,)),
        nested(MAX_EXT_DEPTH + 1, wrap=lambda v: frozenset([v])),
        nested(5000, wrap=lambda v: (v,)),
        nested(MAX_DEPTH - 8 * EXT_LEVEL + 1, nested(8, wrap=lambda v: (v,))),
    ]
    for value in too_deep:
        for encode, prefix in ((codec.encode, "value"), (codec.canonical, "value[0]")):
            with pytest.raises(UncacheableValueError) as info:
                encode((value,) if encode == codec.canonical else value)
            assert info.value.path.startswith(prefix)
            assert "nests deeper" in str(info.value)


def test_a_deep_caller_stack_is_uncacheable_not_a_recursion_error() -> None:
    """Nesting within the format's bounds can still meet Python's recursion limit when
    the caller's own stack is deep: that too is an UncacheableValueError."""
    import sys

    codec = Codec()
    value = nested(100)
    limit = sys.getrecursionlimit()
    frames = len(inspect_stack())
    sys.setrecursionlimit(frames + 80)
    try:
        for encode in (codec.encode, lambda v: codec.canonical((v,))):
            with pytest.raises(UncacheableValueError):
                encode(value)
    finally:
        sys.setrecursionlimit(limit)


def inspect_stack() -> list[Any]:
    import inspect as pyinspect

    return pyinspect.stack(context=0)


def test_deeply_nested_extensions_are_a_miss_not_a_crash() -> None:
    """Issue 12: every extension level ran msgpack's unpacker again, with about 40 KiB
    of C stack each, so about 200 nested tuples (or sets, rows, enums, ...) in a payload
    crashed the process with a segmentation fault. Now deeper than the format allows is
    a CorruptPayloadError. Run in a child process, so a crash fails this test only."""
    import subprocess
    import sys

    script = """
import msgpack
from ormcache.codec import Codec
from ormcache.errors import CorruptPayloadError

codes = [1, 2, 3, 5, 7, 8, 11, 12, 14]
for depth in (200, 5000):
    for mix in [[c] for c in codes] + [codes]:
        data = msgpack.packb([1])
        for i in range(depth):
            data = msgpack.packb([msgpack.ExtType(mix[i % len(mix)], data)])
        payload = b"OC\\x01\\x00" + msgpack.packb([[], [], msgpack.ExtType(mix[0], data)])
        try:
            Codec().decode(payload)
        except CorruptPayloadError:
            pass
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "ok"), proc.stderr[-2000:]


def _account_payload(codec: Codec) -> tuple[list[Any], list[Any], Any]:
    account = Account(
        id=1,
        name="a",
        created_at=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
        balance=decimal.Decimal("1.00"),
        ident=uuid.UUID(int=1),
        colour=Colour.RED,
        data={"k": 1},
        blob=b"",
        period=dt.timedelta(0),
    )
    inspect(account).key = (Account, (1,), None)  # as if loaded
    payload = codec.encode(account)
    parts = msgpack.unpackb(payload[4:], raw=False, strict_map_key=False, ext_hook=msgpack.ExtType)
    return parts[0], parts[1], parts[2]


def test_deep_nesting_around_instances_is_a_miss_by_design() -> None:
    """A payload with instances is walked again on every hit: nesting deeper than an
    encoder writes, in the value or in a column, is refused when it is parsed, not met
    as a RecursionError while building a hit."""
    codec = Codec()
    mappers, instances, root = _account_payload(codec)
    data_at = Account.__mapper__.column_attrs.keys().index("data")
    deep_column = [list(i) for i in instances]
    deep_column[0][2] = list(deep_column[0][2])
    deep_column[0][2][data_at] = nested(1000)
    for body in ([mappers, instances, [root, nested(1000)]], [mappers, deep_column, root]):
        with pytest.raises(CorruptPayloadError) as info:
            codec.decode(MAGIC_HEADER + msgpack.packb(body, use_bin_type=True))
        assert not isinstance(info.value.__cause__, RecursionError)


def test_an_instance_reference_inside_a_column_is_a_miss() -> None:
    """A column value never holds an instance: a forged reference there must not reach
    the caller as a placeholder object (payload large enough not to be memoized)."""
    codec = Codec()
    mappers, instances, root = _account_payload(codec)
    data_at = Account.__mapper__.column_attrs.keys().index("data")
    forged = [list(i) for i in instances]
    forged[0][2] = list(forged[0][2])
    forged[0][2][data_at] = [msgpack.ExtType(13, (0).to_bytes(4, "big"))]
    body = [mappers, forged, [root, b"x" * 20_000]]
    with pytest.raises(CorruptPayloadError):
        codec.decode(MAGIC_HEADER + msgpack.packb(body, use_bin_type=True))


@pytest.mark.parametrize(
    "body",
    [
        b"\xdd\xff\xff\xff\xff",  # array of 4 Gi items
        b"\xdf\xff\xff\xff\xff",  # map of 4 Gi pairs
        b"\xdb\xff\xff\xff\xff",  # str of 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bin of 4 GiB
        b"\xc9\xff\xff\xff\xff\x01",  # ext of 4 GiB
        b"\x93\x90\x90\xc7\x05\x01\xdd\xff\xff\xff\xff",  # a tuple claiming 4 Gi items
        b"\x93\x90\x90\xc7\x05\x04\xff\xff\xff\xff\xff",  # a bigint of its own size only
        b"\x93\x90\x90" + b"\xc7\x0b\x09" + b"1E999999999",  # a decimal with a vast exponent
    ],
)
def test_huge_declared_sizes_are_a_miss_or_small(body: bytes) -> None:
    """Sizes in a payload are claims: nothing is allocated beyond the payload's own
    size, and what does not fit is a miss."""
    try:
        value = Codec().decode(MAGIC_HEADER + body)
    except CorruptPayloadError:
        return
    assert len(repr(value)) < 100


ext_codes = st.integers(min_value=0, max_value=17)
msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
        st.builds(msgpack.ExtType, ext_codes, st.binary(max_size=16)),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=4), st.integers(-(2**63), 2**63 - 1)), children, max_size=3
        ),
        st.builds(
            lambda code, obj: msgpack.ExtType(code, msgpack.packb(obj, use_bin_type=True)),
            ext_codes,
            children,
        ),
    ),
    max_leaves=12,
)


@FAST
@given(st.booleans(), st.lists(msgpack_values, max_size=3), msgpack_values)
def test_wrong_types_anywhere_in_a_body_are_only_a_miss(
    real_mapper: bool, instances: list[Any], root: Any
) -> None:
    """Any msgpack structure in the body's slots, extensions included (right codes,
    wrong contents), decodes or is a CorruptPayloadError, whatever it names."""
    codec = Codec()
    info = codec.mapper_info(inspect(Account))
    mappers = [[info.key, info.fingerprint]] if real_mapper else []
    body = msgpack.packb([mappers, instances, root], use_bin_type=True)
    with contextlib.suppress(CorruptPayloadError):
        codec.decode(MAGIC_HEADER + body)
