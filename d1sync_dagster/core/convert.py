"""Postgres JSON value -> SQLite value, per column type. The one place the conversion rules live.

Values arrive as `to_jsonb()` renders them and `loads_exact` decodes them (a number with a fraction or
exponent becomes a float only when that is exact, else a Decimal, so no digit is lost before its column
type decides):

- INTEGER: exact 64-bit integers (beyond 2^53 too); an integral number; numeric text; an ISO-8601 timestamp
  becomes Unix seconds (floor; no zone means UTC), the seed's rule. Out of int64 range is refused.
- REAL: any finite number as a float. NaN and infinities are refused (SQLite cannot store NaN, JSON cannot
  carry either).
- TEXT: strings as they are, with UUIDs lower-cased; numbers and booleans as their JSON text; objects and
  arrays as canonical JSON.
- BOOLEAN: true/false (also 0/1, "t"/"f", "true"/"false") as 1/0.
- JSON: canonical JSON text (sorted keys, no spaces, exact numbers). A string that holds a JSON object or array
  (a `text` column used for JSON) is parsed and canonicalised; any other string is stored as a JSON string.
- BLOB: bytea's `\\x..` hex as bytes.
- NULL stays NULL for every type.

A value that cannot convert raises `ConversionError`; the message is dead-lettered with the reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import orjson

from d1sync_dagster.exactjson import INT64_MAX, INT64_MIN, loads_exact

if TYPE_CHECKING:
    from d1sync_dagster.schema import ColumnType

SqlValue = None | int | float | str | bytes

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_INT_TEXT = re.compile(r"^[+-]?\d+$")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}(:?\d{2})?)?$")


class ConversionError(ValueError):
    """A value that does not fit its column type. The message names the type, never the value."""


def _check_text(s: str) -> str:
    if s.isascii():  # the common case: only a NUL can be wrong, an ASCII string holds no surrogates
        if "\x00" in s:
            raise ConversionError("text contains a NUL character, which D1 cannot store")
        return s
    if "\x00" in s:
        raise ConversionError("text contains a NUL character, which D1 cannot store")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ConversionError("text is not valid unicode (lone surrogate)") from None
    return s


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, numbers exact; a deterministic function of the decoded value.

    Numbers that decoded as floats (at most 15 significant digits, so the float is exact) print in their
    shortest form; longer ones decoded as Decimal print as plain decimals. The fast path is orjson; values
    it cannot render (Decimal, integers beyond 64 bits) take the slow path, which spells numbers the same way.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise ConversionError("JSON number is not finite")  # orjson would write null
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        return _canonical_slow(value)


def _canonical_slow(value: Any) -> str:
    if value is None or isinstance(value, bool | int | str):
        return json.dumps(_check_text(value) if isinstance(value, str) else value, ensure_ascii=False)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConversionError("JSON number is not finite")
        return orjson.dumps(value).decode()
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ConversionError("JSON number is not finite")
        return _decimal_text(value)
    if isinstance(value, list):
        return "[" + ",".join(_canonical_slow(v) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ",".join(json.dumps(str(k), ensure_ascii=False) + ":" + _canonical_slow(v) for k, v in items) + "}"
    raise ConversionError(f"cannot render a {type(value).__name__} as JSON")


def _decimal_text(d: Decimal) -> str:
    """Spell a Decimal the way `parse_number` would read it back to the same value and spelling."""
    t = d.normalize()
    if len(t.as_tuple().digits) <= 15:
        return orjson.dumps(float(t)).decode()
    return str(int(t)) + ".0" if t == t.to_integral_value() else format(t, "f")


def _iso_to_unix(s: str) -> int:
    text = s.strip().replace(" ", "T", 1)
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise ConversionError("INTEGER column got text that is neither an integer nor an ISO timestamp") from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return math.floor(ts.timestamp())


def _to_integer(v: Any) -> int:
    if type(v) is int and INT64_MIN <= v <= INT64_MAX:  # the common case, first
        return v
    if isinstance(v, bool):
        out = int(v)
    elif isinstance(v, int):
        out = v
    elif isinstance(v, Decimal | float):
        if isinstance(v, float) and not math.isfinite(v) or isinstance(v, Decimal) and not v.is_finite():
            raise ConversionError("INTEGER column got a non-finite number")
        if v != int(v):
            raise ConversionError("INTEGER column got a number with a fraction")
        out = int(v)
    elif isinstance(v, str):
        if _INT_TEXT.match(v.strip()):
            out = int(v.strip())
        elif _ISO_DATE.match(v.strip()):
            out = _iso_to_unix(v)
        else:
            raise ConversionError("INTEGER column got text that is neither an integer nor an ISO timestamp")
    else:
        raise ConversionError(f"INTEGER column got a JSON {type(v).__name__}")
    if not INT64_MIN <= out <= INT64_MAX:
        raise ConversionError("INTEGER column got a number outside the 64-bit range")
    return out


def _to_real(v: Any) -> float:
    if type(v) is float and math.isfinite(v):
        return v
    if isinstance(v, bool):
        raise ConversionError("REAL column got a boolean")
    if isinstance(v, int | float | Decimal):
        out = float(v)
    elif isinstance(v, str):
        try:
            out = float(Decimal(v.strip()))
        except (InvalidOperation, ValueError):
            raise ConversionError("REAL column got text that is not a number") from None
    else:
        raise ConversionError(f"REAL column got a JSON {type(v).__name__}")
    if not math.isfinite(out):
        raise ConversionError("REAL column got NaN or an infinity, which D1 cannot store")
    return out


def _to_text(v: Any) -> str:
    if isinstance(v, str):
        if len(v) == 36 and _UUID.match(v):
            return v.lower()
        return _check_text(v)
    if isinstance(v, dict | list | bool | int | float | Decimal):
        return canonical_json(v)
    raise ConversionError(f"TEXT column got a JSON {type(v).__name__}")


_TRUE, _FALSE = {"true", "t", "1", "yes", "y", "on"}, {"false", "f", "0", "no", "n", "off"}


def _to_boolean(v: Any) -> int:
    if v is True:
        return 1
    if v is False:
        return 0
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int) and v in (0, 1):
        return v
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return 1 if v.strip().lower() in _TRUE else 0
    raise ConversionError("BOOLEAN column got a value that is not true/false")


def _to_json(v: Any) -> str:
    if isinstance(v, str):
        stripped = v.strip()
        if stripped[:1] in ("{", "["):
            try:
                return canonical_json(loads_exact(stripped))
            except json.JSONDecodeError:
                pass
    return canonical_json(v)


def _to_blob(v: Any) -> bytes:
    if isinstance(v, str) and v.startswith("\\x"):
        try:
            return bytes.fromhex(v[2:])
        except ValueError:
            raise ConversionError("BLOB column got malformed bytea hex") from None
    raise ConversionError("BLOB column expects bytea hex text (\\x...)")


CONVERTERS: dict[str, Callable[[Any], SqlValue]] = {
    "INTEGER": _to_integer,
    "REAL": _to_real,
    "TEXT": _to_text,
    "BOOLEAN": _to_boolean,
    "JSON": _to_json,
    "BLOB": _to_blob,
}


def to_sqlite(value: Any, column_type: ColumnType) -> SqlValue:
    """Convert one value for a column of `column_type` (None stays None)."""
    if value is None:
        return None
    return CONVERTERS[column_type](value)
