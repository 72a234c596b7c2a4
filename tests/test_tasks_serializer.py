"""Runner's typed JSON (``pytunnel.tasks.serializer``): round trips, the exact text Runner
writes, the graph form, escaping, and one typed error for every malformed payload."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytunnel.tasks.serializer import (
    UNDEFINED,
    URL,
    JsError,
    RegExp,
    RunnerMap,
    SerializationError,
    Undefined,
    dumps,
    dumps_bytes,
    loads,
)

UTC = dt.timezone.utc


def test_lone_surrogates_are_written_escaped_on_the_wire() -> None:
    """``"\\ud800"`` is valid JSON (and a valid JavaScript string): read back it is a lone
    surrogate, which UTF-8 cannot hold, so the wire form escapes it as JSON.stringify does."""
    value = loads(b'{"s":"a\\ud800b","\\udc00":1}')
    assert value == {"s": "a\ud800b", "\udc00": 1}
    data = dumps_bytes(value)
    assert data == b'{"s":"a\\ud800b","\\udc00":1}'
    assert loads(data) == value
    assert dumps_bytes({"s": "\u00e9"}) == '{"s":"\u00e9"}'.encode()  # no escaping otherwise


@pytest.mark.parametrize(
    "text", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "0001-01-01T00:30:00+01:00"]
)
def test_dates_python_cannot_hold_in_utc_are_invalid_not_a_crash(text: str) -> None:
    with pytest.raises(SerializationError):
        loads(json.dumps({"__type": "Date", "value": text}))
    east = dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5)))
    with pytest.raises(SerializationError):
        dumps(east)


def test_an_int_too_long_for_str_is_a_serialization_error() -> None:
    """Python refuses str() of an int past 4,300 digits; that is one SerializationError (the
    server's 500 in the protocol's JSON), not a bare ValueError."""
    for value in (2**20000, {"a": [2**20000]}, {1: 2**20000}):
        with pytest.raises(SerializationError):
            dumps(value)


def test_plain_json_is_plain() -> None:
    value = {"a": [1, 2.5, "x", None, True], "b": {}}
    assert json.loads(dumps(value)) == value
    assert loads(dumps(value)) == value


def test_date_is_written_as_toisostring_and_read_back_aware() -> None:
    when = dt.datetime(2024, 2, 29, 13, 4, 5, 678901, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    text = dumps({"at": when})
    assert text == '{"at":{"__type":"Date","value":"2024-02-29T11:04:05.678Z"}}'
    back = loads(text)["at"]
    assert back == when.replace(microsecond=678000)
    assert back.tzinfo is not None


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(SerializationError, match="naive"):
        dumps(dt.datetime(2024, 1, 1))


def test_undefined_is_not_none() -> None:
    assert dumps(UNDEFINED) == '{"__type":"Undefined","value":null}'
    assert loads(dumps([UNDEFINED, None])) == [UNDEFINED, None]
    assert Undefined() is UNDEFINED
    assert not UNDEFINED


def test_map_set_bigint_nonfinite_regexp_url_error() -> None:
    value: dict[str, Any] = {
        "m": RunnerMap({"k": 1, 2: "two"}),
        "s": {1, 2},
        "big": 2**70,
        "small": 5,
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "re": RegExp("^a+$", "gi"),
        "url": URL("https://example.com/x?y=1"),
        "err": JsError("TypeError", "bad", "stack here", UNDEFINED, {"extra": 1}),
    }
    back = loads(dumps(value))
    assert back["m"] == {"k": 1, 2: "two"}
    assert isinstance(back["m"], RunnerMap)
    assert back["s"] == {1, 2}
    assert back["big"] == 2**70
    assert json.loads(dumps(value))["big"] == {"__type": "BigInt", "value": str(2**70)}
    assert back["small"] == 5
    assert math.isnan(back["nan"])
    assert back["inf"] == math.inf
    assert back["ninf"] == -math.inf
    assert back["re"] == RegExp("^a+$", "gi")
    assert back["url"] == URL("https://example.com/x?y=1")
    assert back["err"] == JsError("TypeError", "bad", "stack here", UNDEFINED, {"extra": 1})


def test_dict_with_non_string_keys_is_a_map() -> None:
    assert json.loads(dumps({1: "a"})) == {"__type": "Map", "value": [[1, "a"]]}


def test_python_exception_is_written_as_error() -> None:
    assert json.loads(dumps(ValueError("nope"))) == {
        "__type": "Error",
        "value": {"name": "ValueError", "message": "nope", "customFields": {}},
    }


def test_marker_keys_are_escaped_and_unescaped() -> None:
    value = {"__type": "Date", "value": "not a date", "__graph": True, "$runner.escape::x": 1}
    text = dumps(value)
    assert json.loads(text) == {
        "$runner.escape::__type": "Date",
        "value": "not a date",
        "$runner.escape::__graph": True,
        "$runner.escape::$runner.escape::x": 1,
    }
    assert loads(text) == value


def test_markers_spelled_with_unicode_escapes_are_still_markers() -> None:
    """Plain JSON is read without the reviving walk; a marker key or an escaped key written
    with ``\\u`` escapes is JSON for the same key, and is read as Runner reads it."""
    assert loads('{"\\u005f_type":"Undefined","value":null}') is UNDEFINED
    assert loads('{"a":{"__t\\u0079pe":"BigInt","value":"12345678901234567890"}}') == {
        "a": 12345678901234567890
    }
    assert loads('{"\\u0024runner.escape::__type":1}') == {"__type": 1}
    assert loads('{"k":"\\u00e9","n":[1,2.5,null,true]}') == {
        "k": "\u00e9",
        "n": [1, 2.5, None, True],
    }
    with pytest.raises(SerializationError):
        loads('{"\\u005f_type":"NoSuchType","value":1}')


def test_type_record_without_value_is_a_plain_object() -> None:
    assert loads('{"__type": "Date"}') == {"__type": "Date"}


def test_graph_form_keeps_shared_and_circular_references() -> None:
    text = json.dumps(
        {
            "__graph": True,
            "version": 1,
            "root": {"__ref": "obj_1"},
            "nodes": {
                "obj_1": {
                    "kind": "object",
                    "value": {
                        "a": {"__ref": "obj_2"},
                        "b": {"__ref": "obj_2"},
                        "me": {"__ref": "obj_1"},
                    },
                },
                "obj_2": {
                    "kind": "array",
                    "value": [1, {"__type": "Date", "value": "2020-01-01T00:00:00.000Z"}],
                },
                "obj_3": {"kind": "type", "type": "Map", "value": [["k", 1]]},
            },
        }
    )
    root = loads(text)
    assert root["a"] is root["b"]
    assert root["me"] is root
    assert root["a"][1] == dt.datetime(2020, 1, 1, tzinfo=UTC)


def test_graph_type_node() -> None:
    text = json.dumps(
        {
            "__graph": True,
            "version": 1,
            "root": [{"__ref": "obj_1"}],
            "nodes": {"obj_1": {"kind": "type", "type": "Set", "value": [1, 2]}},
        }
    )
    assert loads(text) == [{1, 2}]


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "NaN",
        '{"a": Infinity}',
        b"\xff\xfe",
        '{"__type": "Nope", "value": 1}',
        '{"__type": "Date", "value": 5}',
        '{"__type": "Date", "value": "yesterday"}',
        '{"__type": "BigInt", "value": "12a"}',
        '{"__type": "BigInt", "value": 12}',
        '{"__type": "NonFiniteNumber", "value": "nan"}',
        '{"__type": "RegExp", "value": {"pattern": "a", "flags": "gg"}}',
        '{"__type": "RegExp", "value": {"pattern": "a", "flags": "q"}}',
        '{"__type": "RegExp", "value": "a"}',
        '{"__type": "Map", "value": [[1]]}',
        '{"__type": "Map", "value": [[{"o": 1}, 1]]}',
        '{"__type": "Set", "value": 3}',
        '{"__type": "URL", "value": 3}',
        '{"__type": "Error", "value": {"name": 1, "message": "x"}}',
        '{"__graph": true, "root": {"__ref": "missing"}, "nodes": {}}',
        '{"__graph": true, "root": {"__ref": "a", "x": 1}, "nodes": {}}',
        '{"__graph": true, "root": {"__ref": "a"}, "nodes": {"a": {"kind": "weird"}}}',
        '{"__graph": true, "root": {"__ref": "a"}, "nodes": {"a": {"kind": "array", "value": 1}}}',
        "[" * 100000 + "]" * 100000,
    ],
)
def test_malformed_payloads_are_one_typed_error(text: str | bytes) -> None:
    with pytest.raises(SerializationError):
        loads(text)


def test_unwritable_values_are_one_typed_error() -> None:
    with pytest.raises(SerializationError):
        dumps(object())
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(SerializationError, match="circular"):
        dumps(loop)
    deep: Any = []
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(SerializationError):
        dumps(deep)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.just(UNDEFINED)
    | st.datetimes(timezones=st.just(UTC)).map(
        lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000)
    ),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_round_trip(value: Any) -> None:
    assert loads(dumps(value)) == value


def _corpus() -> list[Any]:
    """Values of every kind, and random nestings of them (seeded: the same every run)."""
    import random

    leaves: list[Any] = [
        None,
        True,
        0,
        -7,
        2**53 - 1,
        2**53,
        -(2**70),
        1.5,
        -0.25,
        math.nan,
        math.inf,
        -math.inf,
        "",
        "text with \u00e9 and \u2028 and \U0001f600",
        UNDEFINED,
        dt.datetime(2024, 2, 29, 23, 59, 59, 999000, tzinfo=UTC),
        dt.datetime(1, 1, 1, tzinfo=UTC),
        RegExp("^a+(b|c)$", "gimsuy"),
        URL("https://example.com/a?b=1#c"),
        {1, "two"},
        RunnerMap({"k": 1, 2: [3]}),
        {"__type": "Date", "value": "x", "__graph": 1, "$runner.escape::y": 2},
        JsError("TypeError", "bad input", "TypeError: bad input\n    at f (a.js:1:1)"),
        # each with a stack: an Error revived in Node without one gets Node's own
        JsError(
            "AppError",
            "with a cause",
            "AppError: with a cause",
            JsError("Error", "the cause", "Error: the cause"),
            {"code": "E_APP", "when": dt.datetime(2024, 1, 2, tzinfo=UTC), "__type": 1},
        ),
    ]
    rng = random.Random(15)

    def nest(depth: int) -> Any:
        if depth == 0 or rng.random() < 0.3:
            return rng.choice(leaves)
        if rng.random() < 0.5:
            return [nest(depth - 1) for _ in range(rng.randint(0, 3))]
        return {f"k{i}": nest(depth - 1) for i in range(rng.randint(0, 3))}

    return leaves + [nest(4) for _ in range(200)]


def test_runner_serializer_writes_back_the_same_text(runner_dir: Path) -> None:
    """Runner's own Serializer reads what this one writes and writes back the same text."""
    import os
    import subprocess

    texts = [dumps(value) for value in _corpus()]
    out = subprocess.run(
        ["node", str(Path(__file__).parent / "node" / "runner_serializer.mjs")],
        input="\n".join(texts) + "\n",
        capture_output=True,
        text=True,
        env={**os.environ, "RUNNER_DIR": str(runner_dir)},
        timeout=120,
        check=True,
    )
    back = out.stdout.split("\n")[:-1]  # not splitlines(): U+2028 is inside the texts
    assert len(back) == len(texts)
    for text, node_text in zip(texts, back, strict=True):
        assert node_text == text
