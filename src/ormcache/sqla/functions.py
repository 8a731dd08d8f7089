"""What a SQL function call means for caching: deterministic, time, volatile, or unknown.

A cached result is served again later, so every function a statement calls must give
the same answer for the same data. That is decided by an **allowlist**: a function is
deterministic only when it is named below (or declared by the application through
:class:`FunctionRules`). Everything else is refused for caching, and split by what it
may do besides:

* ``time`` — the clock (``now()``, ``current_timestamp``...): cacheable only by an
  explicit opt-in, since the answer changes while the data does not;
* ``volatile`` — built-ins known to vary or to touch session state, but never to write a
  table (``random()``, ``nextval()``, ``current_user``...);
* ``writes`` — declared by the application to write the tables it names;
* ``unknown`` — anything else, such as a user-defined function: it may write, so a
  statement calling it is a write to the whole namespace.

Names are compared in lower case, as PostgreSQL and MySQL fold unquoted function names.
Spellings from SQLAlchemy (``func.char_length``) and sqlglot's canonical names
(``CURRENT_TIMESTAMP`` for ``NOW()``) are both listed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["DETERMINISTIC", "TIME", "VOLATILE", "FunctionRules", "Kind", "classify"]


def _names(words: str) -> frozenset[str]:
    return frozenset(words.split())


Kind = Literal["deterministic", "time", "volatile", "writes", "unknown"]

DETERMINISTIC = _names(
    # Operators and syntax that sqlglot models as function nodes.
    "and or xor not case if iif cast try_cast convert extract collate exists filter within_group"
    " array struct tuple paren"
    # Aggregates.
    " count count_if sum min max avg array_agg string_agg group_concat aggregate_strings"
    " json_agg jsonb_agg json_object_agg jsonb_object_agg json_arrayagg json_objectagg"
    " j_s_o_n_array_agg j_s_o_n_object_agg bool_and bool_or every logical_and logical_or"
    " bit_and bit_or bit_xor stddev stddev_pop stddev_samp variance var_pop var_samp"
    " variance_pop percentile_cont percentile_disc median mode grouping grouping_id"
    " cube rollup grouping_sets grouping sets"
    # Window functions.
    " row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value"
    " last_value nth_value"
    # Strings.
    " lower upper initcap length char_length character_length octet_length bit_length"
    " trim ltrim rtrim btrim substr substring substring_index left right lpad rpad pad"
    " repeat replace reverse translate concat concat_ws position strpos str_position instr"
    " locate ascii chr char split_part regexp_replace regexp_like regexp_substr"
    " regexp_extract md5 sha1 sha2 hex unhex to_hex lower_hex encode quote_ident quote_literal"
    " string_to_array array_to_string starts_with ends_with"
    # Numbers.
    " abs round floor ceil ceiling trunc truncate mod power pow sqrt cbrt exp ln log log10"
    " log2 sign div"
    # Nulls and comparison.
    " coalesce nullif greatest least ifnull nvl nvl2"
    # Dates of a given value ('now' as a literal is caught separately).
    " date time datetime year month day hour minute second quarter week dayofweek"
    " dayofyear day_of_week day_of_year day_of_month date_part date_trunc datediff"
    " date_add date_sub timestamp_trunc time_trunc datetime_trunc to_char to_number"
    " to_date to_timestamp strftime julianday unixepoch"
    # JSON and arrays.
    " json_extract json_extract_scalar json_extract_array json_unquote json_value json_query"
    " json_object json_array json_build_object jsonb_build_object json_build_array"
    " jsonb_build_array json_array_length jsonb_array_length json_extract_path"
    " json_extract_path_text jsonb_extract_path jsonb_extract_path_text jsonb_extract"
    " jsonb_extract_scalar to_json to_jsonb json_typeof jsonb_typeof json_type json_keys"
    " json_contains jsonb_contains jsonb_exists json_set jsonb_set json_remove json_valid"
    " json_each jsonb_each json_array_elements jsonb_array_elements json_array_elements_text"
    " jsonb_array_elements_text json_tree parse_json j_s_o_n_object j_s_o_n_array"
    " array_contains array_contains_all array_overlaps array_length array_size cardinality"
    " array_position array_append array_prepend array_cat array_remove unnest"
    " generate_series exploding_generate_series typeof"
)

TIME = _names(
    "now current_timestamp current_date current_time current_datetime localtime"
    " localtimestamp sysdate systimestamp getdate getutcdate utc_timestamp utc_date"
    " utc_time curdate curtime clock_timestamp statement_timestamp transaction_timestamp"
    " timeofday unix_timestamp age"
)

VOLATILE = _names(
    # Randomness and identifiers.
    "random rand randn randstr uuid gen_random_uuid uuid_generate_v1 uuid_generate_v4"
    " uuid_short newid sys_guid"
    # Sequences and the connection's own state.
    " next_value nextval currval lastval next_value_for last_insert_id last_insert_rowid"
    " changes total_changes row_count found_rows connection_id pg_backend_pid txid_current"
    " pg_current_xact_id current_setting"
    # Who and where.
    " current_user session_user user system_user current_role current_schema"
    " current_schemas current_database current_catalog database schema version"
    " inet_client_addr inet_server_addr"
    # Side effects that write no table.
    " pg_sleep sleep benchmark get_lock release_lock pg_advisory_lock"
    " pg_advisory_xact_lock pg_try_advisory_lock pg_advisory_unlock"
)


@dataclass(frozen=True)
class FunctionRules:
    """What the application (or the database catalog) vouches for about its functions.

    ``deterministic``: names that always give the same answer for the same arguments and
    write nothing (PostgreSQL ``IMMUTABLE``): treated as if on the allowlist.
    ``read_only``: names that may vary but never write (``STABLE``): never cached, never
    a write. ``writes``: name -> the table fullnames a call may write; a statement that
    calls it writes those tables instead of the whole namespace. Names are lower case, and
    schema-qualified calls are looked up by their dotted name (``"app.touch"``).
    """

    deterministic: frozenset[str] = frozenset()
    read_only: frozenset[str] = frozenset()
    writes: Mapping[str, frozenset[str]] = field(default_factory=dict)


NO_RULES = FunctionRules()


def classify(name: str, rules: FunctionRules | None = None) -> Kind:
    """The kind of a call to ``name`` (lower case; dotted when schema-qualified).

    A qualified name is never on the built-in lists: ``app.lower()`` is the
    application's own function, whatever it is called.
    """
    rules = rules or NO_RULES
    if name in rules.deterministic:
        return "deterministic"
    if name in rules.writes:
        return "writes"
    if name in rules.read_only:
        return "volatile"
    if "." in name:
        return "unknown"
    if name in DETERMINISTIC:
        return "deterministic"
    if name in TIME:
        return "time"
    if name in VOLATILE:
        return "volatile"
    return "unknown"
