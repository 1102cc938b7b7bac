"""Exact JSON decoding, shared by the Postgres client (jsonb columns) and the conversion rules.

JSON numbers must never lose digits on their way from Postgres to D1: `loads_exact` decodes integers as
`int` and any other number as a float only when the float is exactly that number, else as a `Decimal`.
It lives apart from `core/` so that the Postgres client can decode queue messages with it without
reaching into the conversion logic.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _float_keeps(text: str) -> bool:
    """Whether the decimal `text` is exactly the shortest spelling of the float nearest to it."""
    shortest = repr(float(text))
    return shortest == text or Decimal(shortest) == Decimal(text)


def parse_number(text: str) -> float | Decimal:
    """JSON `parse_float`: a float when it keeps the number exactly (at most 15 significant digits, or the
    shortest spelling of a double, as Postgres prints float8), else a Decimal."""
    digits = len(text.split("e")[0].split("E")[0].replace("-", "").replace(".", "").strip("0"))
    return float(text) if digits <= 15 or _float_keeps(text) else Decimal(text)


# A number that a float or int64 may not hold exactly has at least 17 characters (16+ significant digits
# and a dot, or an integer of 19+ digits). Whether the text has such a run of number characters at all is
# one bytes.translate and one substring search (much faster than a regex); only then are the runs checked
# one by one (a run that is not a number, digits inside a string, just takes the slow, exact path).
_NUMBER_CHARS = set(b"0123456789.eE+-")
_ONLY_NUMBER_CHARS = bytes(c if c in _NUMBER_CHARS else 32 for c in range(256))
_NUMBER_MASK = bytes(0 if c in _NUMBER_CHARS else 32 for c in range(256))
_LONG_RUN = b"\0" * 17


def _orjson_keeps(token: bytes) -> bool:
    """Whether orjson decodes this number token without losing anything."""
    text = token.decode()
    try:
        if repr(float(text)) == text:  # the common case: a double in its shortest spelling, as Postgres prints
            return True
    except ValueError:
        return False
    try:
        if b"." in token or b"e" in token or b"E" in token:
            return _float_keeps(text)
        return INT64_MIN <= int(text) <= INT64_MAX
    except (ValueError, ArithmeticError):
        return False


def loads_exact(data: str | bytes) -> Any:
    """Decode JSON without losing digits: integers as int, other numbers per `parse_number`.

    When every number with a fraction or exponent is short or the shortest spelling of a double (the
    common case: Postgres prints float8 that way), orjson decodes the text; otherwise the standard decoder
    with `parse_number` does, keeping long decimals as Decimal.
    """
    raw = data if data.__class__ is bytes else data.encode() if isinstance(data, str) else bytes(data)
    if _LONG_RUN in raw.translate(_NUMBER_MASK):
        for token in raw.translate(_ONLY_NUMBER_CHARS).split():
            if len(token) >= 17 and not _orjson_keeps(token):
                return json.loads(raw, parse_float=parse_number)
    return orjson.loads(raw)
