"""List and dict payload values are written exactly as TelemetryDeck's JavaScript SDK writes
them: with ``JSON.stringify``.

The expected texts were computed by Node.js from the same values, with
``node tests/js/json_table.js``, whose output is the table below.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from kaibantrace._encode.pipeline import Reporter, clean_payload

TABLE = [
    ([1.0, 2.5],
     "[1,2.5]"),
    ({"a": 2.0},
     "{\"a\":2}"),
    ([1e-7, 1e16],
     "[1e-7,10000000000000000]"),
    ([1e21, 1.5e-7, 123.25, -0.0, 0.1 + 0.2],
     "[1e+21,1.5e-7,123.25,0,0.30000000000000004]"),
    ([float('nan'), float('inf'), float('-inf')],
     "[null,null,null]"),
    ([datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)],
     "[\"2024-01-01T00:00:00.000Z\"]"),
    ({"b": 1, "1": 2},
     "{\"1\":2,\"b\":1}"),
    ({"z": 1, "10": 2, "2": 3, "01": 4, "-1": 5, "a": 6},
     "{\"2\":3,\"10\":2,\"z\":1,\"01\":4,\"-1\":5,\"a\":6}"),
    ([True, False, None, 0, -7, 'x'],
     "[true,false,null,0,-7,\"x\"]"),
    (["quote \" back \\ tab \t nl \n ctl \x01 del \x7f é \u2028"],
     "[\"quote \\\" back \\\\ tab \\t nl \\n ctl \\u0001 del \u007f \u00e9 \u2028\"]"),
    ({"k": None, "n": 1},
     "{\"k\":null,\"n\":1}"),
    ([],
     "[]"),
    ({},
     "{}"),
    ((3, 4.5),
     "[3,4.5]"),
]


@pytest.mark.parametrize(("value", "expected"), TABLE)
def test_written_as_json_stringify_writes_it(value: Any, expected: str) -> None:
    assert clean_payload("evt", {"field": value}, Reporter(), strict=True) == {"field": expected}


@pytest.mark.parametrize("value", [[1.5, float("nan")], {"a": float("inf")}, [1e-7]])
def test_the_text_is_valid_json(value: Any) -> None:
    """NaN and the infinities become ``null``, so what is sent always parses as JSON."""
    json.loads(clean_payload("evt", {"field": value}, Reporter(), strict=True)["field"])


@pytest.mark.parametrize("value", [[[1]], {"a": {"b": 1}}, [object()], {1: "int key"}])
def test_nested_containers_and_other_items_are_refused(value: Any) -> None:
    assert clean_payload("evt", {"field": value}, Reporter(), strict=False) == {}


def test_enum_members_inside_are_sent_by_value() -> None:
    import enum

    class Color(str, enum.Enum):
        RED = "red"

    class Size(enum.IntEnum):
        BIG = 3

    assert clean_payload("evt", {"field": [Color.RED, Size.BIG]}, Reporter(),
                         strict=True) == {"field": '["red",3]'}
