import json
import math
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from d1sync_dagster.core.convert import INT64_MAX, INT64_MIN, ConversionError, canonical_json, loads_exact, to_sqlite


@given(st.integers(min_value=INT64_MIN, max_value=INT64_MAX))
def test_integers_are_exact_across_the_int64_range(n):
    assert to_sqlite(n, "INTEGER") == n
    assert to_sqlite(str(n), "INTEGER") == n
    assert to_sqlite(Decimal(n), "INTEGER") == n


@pytest.mark.parametrize("n", [INT64_MAX + 1, INT64_MIN - 1])
def test_integers_outside_int64_are_refused(n):
    with pytest.raises(ConversionError, match="64-bit range"):
        to_sqlite(n, "INTEGER")


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("1970-01-01T00:00:00Z", 0),
        ("2024-02-29T12:34:56.789+00:00", 1709210096),
        ("2024-02-29T14:34:56+02:00", 1709210096),
        ("2024-02-29 12:34:56", 1709210096),  # no zone: UTC
        ("1969-12-31T23:59:59.5Z", -1),  # floor, as the seed did
        ("2024-02-29", 1709164800),
    ],
)
def test_iso_timestamps_in_integer_columns_become_unix_seconds(text, seconds):
    assert to_sqlite(text, "INTEGER") == seconds


@pytest.mark.parametrize("bad", ["abc", "12.5x", [1], {"a": 1}, Decimal("1.5"), 1.5])
def test_integer_refuses_what_does_not_fit(bad):
    with pytest.raises(ConversionError):
        to_sqlite(bad, "INTEGER")


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_real_keeps_every_finite_double(f):
    assert to_sqlite(f, "REAL") == f
    assert to_sqlite(Decimal(repr(f)), "REAL") == f


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "x", True])
def test_real_refuses_nan_infinities_and_non_numbers(bad):
    with pytest.raises(ConversionError):
        to_sqlite(bad, "REAL")


@pytest.mark.parametrize("value, expected", [(True, 1), (False, 0), (1, 1), (0, 0), ("t", 1), ("false", 0)])
def test_boolean_is_zero_or_one(value, expected):
    assert to_sqlite(value, "BOOLEAN") == expected


def test_boolean_refuses_other_values():
    with pytest.raises(ConversionError, match="BOOLEAN"):
        to_sqlite("maybe", "BOOLEAN")


def test_uuid_text_is_lower_cased_and_other_text_kept():
    assert to_sqlite("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "TEXT") == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert to_sqlite("Hello World", "TEXT") == "Hello World"
    assert to_sqlite({"b": 1, "a": 2}, "TEXT") == '{"a":2,"b":1}'


def test_text_with_nul_is_refused():
    with pytest.raises(ConversionError, match="NUL"):
        to_sqlite("a\x00b", "TEXT")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
).filter(lambda v: "\\u0000" not in json.dumps(v))


@given(st.lists(json_values, max_size=4) | st.dictionaries(st.text(max_size=5), json_values, max_size=4))
def test_json_is_canonical_and_round_trips(value):
    decoded = loads_exact(json.dumps(value))  # as a queue message would decode it
    text = to_sqlite(decoded, "JSON")
    exact = {"parse_float": Decimal, "parse_int": Decimal}
    assert json.loads(text, **exact) == json.loads(json.dumps(value), **exact)
    assert to_sqlite(loads_exact(text), "JSON") == text  # canonical form is a fixed point


def test_json_numbers_stay_exact():
    assert canonical_json({"big": 9007199254740993, "d": Decimal("0.30000000000000004441")}) == (
        '{"big":9007199254740993,"d":0.30000000000000004441}'
    )
    assert (
        canonical_json(loads_exact('{"d": 0.30000000000000004441, "f": 2.50}'))
        == '{"d":0.30000000000000004441,"f":2.5}'
    )


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_loads_exact_keeps_every_number_exactly(f):
    assert Decimal(str(loads_exact(repr(f)))) == Decimal(repr(f))
    assert loads_exact("123456789.123456789123") == Decimal("123456789.123456789123")


def test_json_text_holding_an_object_is_canonicalised_other_text_is_a_json_string():
    assert to_sqlite('{"b": 1, "a": [1, 2]}', "JSON") == '{"a":[1,2],"b":1}'
    assert to_sqlite("plain", "JSON") == '"plain"'


def test_blob_from_bytea_hex():
    assert to_sqlite("\\xdeadbeef", "BLOB") == b"\xde\xad\xbe\xef"
    assert to_sqlite("\\x", "BLOB") == b""
    with pytest.raises(ConversionError, match="hex"):
        to_sqlite("\\xzz", "BLOB")
    with pytest.raises(ConversionError):
        to_sqlite("deadbeef", "BLOB")


@pytest.mark.parametrize("typ", ["INTEGER", "REAL", "TEXT", "BOOLEAN", "JSON", "BLOB"])
def test_null_stays_null(typ):
    assert to_sqlite(None, typ) is None


def test_non_finite_json_is_refused():
    with pytest.raises(ConversionError):
        canonical_json(math.inf)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"n": 9223372036854775808}', 9223372036854775808),  # beyond int64: still exact
        ('{"n": -9223372036854775809}', -9223372036854775809),
        ('{"n": 0.33333333333333333333}', Decimal("0.33333333333333333333")),  # numeric with 20 digits
        ('{"n": 0.3333333333333333}', 0.3333333333333333),  # float8 as Postgres prints it
        ('{"n": 1.0000000000000002}', 1.0000000000000002),
        ('{"n": 12345678901234567890.5}', Decimal("12345678901234567890.5")),
        ('{"s": "12345678901234567890", "n": 1.5}', 1.5),  # long digits inside a string are harmless
    ],
)
def test_loads_exact_never_loses_digits(text, expected):
    got = loads_exact(text)["n"]
    assert got == expected and type(got) is type(expected)


number_texts = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.decimals(allow_nan=False, allow_infinity=False).map(lambda d: format(d, "f")),
    st.tuples(st.integers(1, 9), st.text("0123456789", min_size=10, max_size=25), st.integers(-30, 30)).map(
        lambda t: f"{t[0]}.{t[1]}e{t[2]}"
    ),
)


@given(st.lists(number_texts, min_size=1, max_size=5))
def test_loads_exact_decodes_every_number_as_the_exact_decoder_does(texts):
    from d1sync_dagster.exactjson import parse_number

    text = '{"a": [' + ", ".join(texts) + "]}"
    want = json.loads(text, parse_float=parse_number)
    got = loads_exact(text)
    assert got == want and [type(x) for x in got["a"]] == [type(x) for x in want["a"]]
