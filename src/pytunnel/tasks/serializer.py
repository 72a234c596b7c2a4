"""Runner's typed JSON, read and written the way ``@bluelibs/runner`` 5.5 does.

Plain JSON carries what JSON can; a value JSON cannot carry is a record
``{"__type": NAME, "value": PAYLOAD}``. Python values map to Runner's as follows:

========================  =========================================================
Runner                    Python
========================  =========================================================
``Date``                  an aware :class:`datetime.datetime` (written in UTC, to
                          the millisecond, as ``Date.toISOString`` does)
``Undefined``             :data:`UNDEFINED` (``undefined`` is not ``null``)
``Map``                   :class:`RunnerMap` (a ``dict``); a plain ``dict`` with a
                          key that is not a ``str`` is written as a ``Map`` too
``Set``                   ``set`` / ``frozenset``
``BigInt``                ``int`` (written as a ``BigInt`` beyond 2**53 - 1, where a
                          JavaScript number would lose digits)
``NonFiniteNumber``       ``float`` NaN and the infinities
``RegExp``                :class:`RegExp` (JavaScript's syntax is not Python's)
``URL``                   :class:`URL`
``Error``                 :class:`JsError`
========================  =========================================================

A user's own key named ``__type`` or ``__graph`` (or starting with the escape prefix) is
written escaped (``$runner.escape::__type``) so it cannot be taken for a marker, and read
back unescaped. Runner's graph form (``{"__graph": true, "root": ..., "nodes": ...}``, which
keeps shared and circular references) is read too; it is never written, as Runner's own
``stringify`` never writes it either.

Reading is strict where Runner's is: an unknown ``__type``, a malformed payload, NaN
literals, over-deep nesting are one :class:`SerializationError` (the server answers it with
400 ``INVALID_JSON``).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

__all__ = [
    "UNDEFINED",
    "URL",
    "JsError",
    "RegExp",
    "RunnerMap",
    "SerializationError",
    "Undefined",
    "dumps",
    "dumps_bytes",
    "loads",
]

ESCAPE_PREFIX: Final = "$runner.escape::"
_MARKER_KEYS: Final = frozenset({"__type", "__graph"})
MAX_SAFE_INTEGER: Final = 2**53 - 1
MAX_DEPTH: Final = 500
_BIGINT = re.compile(r"[+-]?\d+")
_REGEXP_FLAGS: Final = frozenset("dgimsuvy")


class SerializationError(ValueError):
    """A payload that is not Runner's typed JSON, or a value it cannot carry."""


class Undefined:
    """JavaScript's ``undefined``: an absent input, distinct from ``null`` (``None``)."""

    _instance: Undefined | None = None

    def __new__(cls) -> Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNDEFINED"

    def __bool__(self) -> bool:
        return False


UNDEFINED: Final = Undefined()


class RunnerMap(dict[Any, Any]):
    """A JavaScript ``Map``: a ``dict`` that is written back as a ``Map`` (keys of any kind,
    order kept)."""


@attrs.frozen
class RegExp:
    """A JavaScript regular expression, carried as its source and flags."""

    pattern: str
    flags: str = ""


@attrs.frozen
class URL:
    """A JavaScript ``URL``, carried as its ``href``."""

    href: str


@attrs.define
class JsError:
    """A JavaScript ``Error`` value (an error as data, not one raised here)."""

    name: str
    message: str
    stack: str | None = None
    cause: object = UNDEFINED
    custom_fields: dict[str, Any] = attrs.field(factory=dict)


def dumps(value: object) -> str:
    """``value`` as Runner's typed JSON text (a lone surrogate in a string stays one: use
    :func:`dumps_bytes` for what goes on the wire)."""
    return _ENCODER.encode(_tree(value))


def dumps_bytes(value: object) -> bytes:
    """``value`` as Runner's typed JSON in UTF-8, always encodable: a string holding a lone
    surrogate (valid in JSON and in JavaScript strings, and what ``\\ud800`` in a peer's
    JSON reads as) is written as its ``\\u`` escape, as ``JSON.stringify`` writes it, where
    encoding it raw would fail."""
    tree = _tree(value)
    try:
        return _ENCODER.encode(tree).encode("utf-8")
    except UnicodeEncodeError:  # rare: only then is the escaping encoder's cost paid
        return _ASCII_ENCODER.encode(tree).encode("ascii")


def _tree(value: object) -> object:
    try:
        try:
            return _fast(value, 0)
        except _TooDeep:  # deep or circular: the careful walk says which
            return _encode(value, 0, set())
    except RecursionError:
        raise SerializationError("the value is nested too deeply") from None
    except SerializationError:
        raise
    except ValueError as exc:  # an int past Python's limit of digits for str() (4,300)
        raise SerializationError(f"the value cannot be written: {exc}") from None


def loads(text: str | bytes) -> Any:
    """Runner's typed JSON text back to Python values."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if "__" not in text and "\\u" not in text and ESCAPE_PREFIX not in text:
            # no marker key (``__type``, ``__graph``) and no escaped key, nor one spelled
            # with ``\u`` escapes: plain JSON, with nothing to revive
            return _PLAIN.decode(text)
        # the tree form is revived as the JSON parser builds each object, innermost first
        parsed = _REVIVING.decode(text)
        if _is_graph(parsed):  # rare (Runner never writes it): read again, as a graph
            raw = _PLAIN.decode(text)
            return _Graph(raw["nodes"]).value(raw["root"], 0)
    except SerializationError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError too
        raise SerializationError(f"invalid JSON: {exc}") from None
    return parsed


def _revive_object(record: dict[str, Any]) -> Any:
    """One JSON object of the tree form (its members already read): a typed record is
    revived, escaped keys are unescaped, anything else stays as it is."""
    name = record.get("__type")
    if isinstance(name, str) and "value" in record:
        return _revive(name, record["value"])
    for key in record:
        if key.startswith(ESCAPE_PREFIX):
            return {_unescape_key(k): v for k, v in record.items()}
    return record


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


# made once: ``json.loads`` and ``json.dumps`` with any option build a new one per call
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)
_PLAIN = json.JSONDecoder(parse_constant=_reject_constant)
_REVIVING = json.JSONDecoder(parse_constant=_reject_constant, object_hook=_revive_object)


# -- writing ----------------------------------------------------------------------------------


def _typed(name: str, value: object) -> dict[str, object]:
    return {"__type": name, "value": value}


def _escape_key(key: str) -> str:
    if key in _MARKER_KEYS or key.startswith(ESCAPE_PREFIX):
        return ESCAPE_PREFIX + key
    return key


def _iso(value: _dt.datetime) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise SerializationError("a naive datetime has no instant: give it a time zone")
    try:
        utc = value.astimezone(_dt.timezone.utc)
    except OverflowError:  # 0001-01-01 east of UTC, 9999-12-31 west of it
        raise SerializationError("the date is out of the range Python can write") from None
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:"
        f"{utc.second:02d}.{utc.microsecond // 1000:03d}Z"
    )


#: past this depth the fast walk hands over to the careful one (well within the interpreter's
#: recursion limit, so a cycle is reported as one)
_FAST_DEPTH = 100


class _TooDeep(Exception):
    """The fast walk went deeper than allowed (a cycle, or a value too deep)."""


def _fast(value: object, depth: int) -> object:
    """:func:`_encode` for the plain JSON types, by exact type (no ``isinstance`` chain,
    no cycle bookkeeping: a cycle only ever goes too deep, and then the careful walk runs);
    anything else goes to :func:`_encode`."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:  # type: ignore[operator]
            return value
        return _typed("BigInt", str(value))
    if kind is float:
        if value - value == 0:  # type: ignore[operator]  # finite (NaN and inf give NaN)
            return value
        return _encode(value, depth, set())
    if kind is dict:
        if depth > _FAST_DEPTH:
            raise _TooDeep
        out: dict[str, object] = {}
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str:
                return _encode(value, depth, set())  # a Map
            if key in _MARKER_KEYS or key.startswith(ESCAPE_PREFIX):
                key = ESCAPE_PREFIX + key
            out[key] = _fast(item, depth + 1)
        return out
    if kind is list or kind is tuple:
        if depth > _FAST_DEPTH:
            raise _TooDeep
        return [_fast(item, depth + 1) for item in value]  # type: ignore[attr-defined]
    return _encode(value, depth, set())


def _encode(value: object, depth: int, stack: set[int]) -> object:
    if depth > MAX_DEPTH:
        raise SerializationError(f"the value is nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            return _typed("BigInt", str(value))
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return _typed("NonFiniteNumber", "NaN")
        if math.isinf(value):
            return _typed("NonFiniteNumber", "Infinity" if value > 0 else "-Infinity")
        return value
    if value is UNDEFINED:
        return _typed("Undefined", None)
    if isinstance(value, _dt.datetime):
        return _typed("Date", _iso(value))
    if isinstance(value, RegExp):
        return _typed("RegExp", {"pattern": value.pattern, "flags": value.flags})
    if isinstance(value, URL):
        return _typed("URL", value.href)
    key = id(value)
    if key in stack:
        raise SerializationError("a circular structure cannot be written")
    stack.add(key)
    try:
        return _encode_container(value, depth, stack)
    finally:
        stack.discard(key)


def _encode_container(value: object, depth: int, stack: set[int]) -> object:
    nested = depth + 1
    if isinstance(value, JsError):
        payload: dict[str, object] = {
            "name": value.name,
            "message": value.message,
            "customFields": {
                _escape_key(k): _encode(v, nested + 1, stack)
                for k, v in value.custom_fields.items()
            },
        }
        if value.stack is not None:
            payload["stack"] = value.stack
        if value.cause is not UNDEFINED:
            payload["cause"] = _encode(value.cause, nested, stack)
        return _typed("Error", payload)
    if isinstance(value, BaseException):
        return _typed(
            "Error", {"name": type(value).__name__, "message": str(value), "customFields": {}}
        )
    if isinstance(value, RunnerMap) or (
        isinstance(value, Mapping) and not all(isinstance(k, str) for k in value)
    ):
        return _typed(
            "Map",
            [
                [_encode(k, nested + 1, stack), _encode(v, nested + 1, stack)]
                for k, v in value.items()
            ],
        )
    if isinstance(value, Mapping):
        return {_escape_key(k): _encode(v, nested, stack) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(item, nested, stack) for item in value]
    if isinstance(value, (set, frozenset)):
        return _typed("Set", [_encode(item, nested + 1, stack) for item in value])
    raise SerializationError(f"a {type(value).__name__} cannot be written as Runner JSON")


# -- reading ----------------------------------------------------------------------------------


def _is_graph(value: object) -> bool:
    return (
        isinstance(value, dict)
        and value.get("__graph") is True
        and "root" in value
        and isinstance(value.get("nodes"), dict)
    )


def _is_typed(value: dict[str, Any]) -> bool:
    return isinstance(value.get("__type"), str) and "value" in value


def _unescape_key(key: str) -> str:
    return key[len(ESCAPE_PREFIX) :] if key.startswith(ESCAPE_PREFIX) else key


def _revive(name: str, data: Any) -> Any:
    reviver = _REVIVERS.get(name)
    if reviver is None:
        raise SerializationError(f"unknown type {name!r}")
    try:
        return reviver(data)
    except SerializationError:
        raise
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise SerializationError(f"invalid {name} payload") from exc


def _revive_date(data: Any) -> _dt.datetime:
    if not isinstance(data, str):
        raise SerializationError("invalid Date payload")
    text = data[:-1] + "+00:00" if data.endswith("Z") else data
    parsed = _dt.datetime.fromisoformat(text)
    if parsed.tzinfo is None:  # JavaScript reads a date-time without offset as local time
        parsed = parsed.astimezone()
    parsed.astimezone(_dt.timezone.utc)  # an instant Python cannot hold in UTC: OverflowError
    return parsed


def _revive_regexp(data: Any) -> RegExp:
    if not isinstance(data, dict) or not isinstance(data.get("pattern"), str):
        raise SerializationError("invalid RegExp payload")
    flags = data.get("flags", "")
    if (
        not isinstance(flags, str)
        or not set(flags) <= _REGEXP_FLAGS
        or len(set(flags)) != len(flags)
    ):
        raise SerializationError("invalid RegExp flags")
    return RegExp(data["pattern"], flags)


def _revive_map(data: Any) -> RunnerMap:
    if not isinstance(data, list) or not all(
        isinstance(entry, list) and len(entry) == 2 for entry in data
    ):
        raise SerializationError("invalid Map payload")
    out = RunnerMap()
    for key, item in data:
        out[_hashable(key)] = item
    return out


def _revive_set(data: Any) -> set[Any]:
    if not isinstance(data, list):
        raise SerializationError("invalid Set payload")
    return {_hashable(item) for item in data}


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        raise SerializationError(
            "a Map key or Set member that is an object cannot be held in Python"
        ) from None
    return value


def _revive_bigint(data: Any) -> int:
    if not isinstance(data, str) or not _BIGINT.fullmatch(data.strip()):
        raise SerializationError("invalid bigint payload")
    return int(data.strip())


def _revive_nonfinite(data: Any) -> float:
    values = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    if data not in values:
        raise SerializationError("invalid non-finite number payload")
    return values[data]


def _revive_url(data: Any) -> URL:
    if not isinstance(data, str):
        raise SerializationError("invalid URL payload")
    return URL(data)


def _revive_error(data: Any) -> JsError:
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("name"), str)
        or not isinstance(data.get("message"), str)
    ):
        raise SerializationError("invalid Error payload")
    stack = data.get("stack")
    custom = data.get("customFields", {})
    if (stack is not None and not isinstance(stack, str)) or not isinstance(custom, dict):
        raise SerializationError("invalid Error payload")
    return JsError(data["name"], data["message"], stack, data.get("cause", UNDEFINED), custom)


_REVIVERS: dict[str, Any] = {
    "Date": _revive_date,
    "Undefined": lambda _data: UNDEFINED,
    "Map": _revive_map,
    "Set": _revive_set,
    "BigInt": _revive_bigint,
    "NonFiniteNumber": _revive_nonfinite,
    "RegExp": _revive_regexp,
    "URL": _revive_url,
    "Error": _revive_error,
}


class _Graph:
    """Runner's graph form: ``{"__ref": id}`` points into ``nodes``; a node is read once, so
    a shared reference stays one Python object and a cycle through a list or dict holds."""

    def __init__(self, nodes: dict[str, Any]) -> None:
        self.nodes = nodes
        self.resolved: dict[str, Any] = {}

    def value(self, value: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise SerializationError(f"the payload is nested deeper than {MAX_DEPTH}")
        if isinstance(value, list):
            return [self.value(item, depth + 1) for item in value]
        if not isinstance(value, dict):
            return value
        if "__ref" in value:
            if len(value) != 1 or not isinstance(value["__ref"], str):
                raise SerializationError("invalid object reference payload")
            return self.node(value["__ref"], depth + 1)
        if _is_typed(value):
            return _revive(value["__type"], self.value(value["value"], depth + 1))
        return {k: self.value(v, depth + 1) for k, v in value.items()}

    def node(self, ref: str, depth: int) -> Any:
        if ref in self.resolved:
            return self.resolved[ref]
        node = self.nodes.get(ref)
        if not isinstance(node, dict):
            raise SerializationError(f"unresolved reference id {ref!r}")
        kind = node.get("kind")
        payload = node.get("value")
        if kind == "array":
            if not isinstance(payload, list):
                raise SerializationError("invalid array node payload")
            items: list[Any] = []
            self.resolved[ref] = items
            items.extend(self.value(item, depth + 1) for item in payload)
            return items
        if kind == "object":
            if not isinstance(payload, dict):
                raise SerializationError("invalid object node payload")
            record: dict[str, Any] = {}
            self.resolved[ref] = record
            record.update((k, self.value(v, depth + 1)) for k, v in payload.items())
            return record
        if kind == "type":
            name = node.get("type")
            if not isinstance(name, str):
                raise SerializationError("invalid type node")
            result = _revive(name, self.value(payload, depth + 1))
            self.resolved[ref] = result
            return result
        raise SerializationError("unsupported node kind")
