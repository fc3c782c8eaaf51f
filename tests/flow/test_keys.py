"""Keys: golden values, stability across interpreters, and the key contract.

``golden_keys.json`` pins the key of every value in :data:`GOLDEN` -- one or
more per encoder -- so any change to the encoding (which would orphan every
stored object) fails here.  New cases are added with::

    python tests/flow/test_keys.py --add-golden

which writes keys for new names only and refuses to change an existing one.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.testing import check_key_stable
from flow.keys import (
    KEY_SIZE,
    Key,
    bytes_key,
    canonical_bytes,
    file_key,
    item_key,
    items_key,
    key,
    register,
)
from flow.values import Blob

GOLDEN_FILE = Path(__file__).resolve().parents[1] / "golden_keys.json"


@dataclasses.dataclass(frozen=True)
class GoldenConfig:
    __flow_name__ = "golden.Config"  # keyed by this name, not by the test module's path

    size: int = 64
    window: tuple = (0.0, 1.0)
    name: str = "lung"


_C = np.arange(12, dtype="<i4").reshape(3, 4)

#: name -> value; the golden key of each is key(value)
GOLDEN: dict[str, Callable[[], Any]] = {
    "none": lambda: None,
    "true": lambda: True,
    "false": lambda: False,
    "int-zero": lambda: 0,
    "int-small": lambda: 7,
    "int-minus-one": lambda: -1,
    "int-255": lambda: 255,
    "int-big": lambda: 2**100,
    "int-big-negative": lambda: -(2**100) + 1,
    "float": lambda: 1.5,
    "float-zero": lambda: 0.0,
    "float-negative-zero": lambda: -0.0,
    "float-nan": lambda: float("nan"),
    "float-inf": lambda: float("inf"),
    "float-minus-inf": lambda: float("-inf"),
    "float-subnormal": lambda: 5e-324,
    "str-empty": lambda: "",
    "str-unicode": lambda: "naïve ☃ 𝄞 日本",
    "bytes-empty": lambda: b"",
    "bytes": lambda: b"\x00\xffflow",
    "tuple-nested": lambda: (1, (2, [3, "x"]), []),
    "list": lambda: [1, 2, 3],
    "dict-mixed": lambda: {"b": 1, "a": [1.0, None], 3: "int key", (1, 2): b"t"},
    "dict-empty": lambda: {},
    "set": lambda: {3, 1, 2},
    "frozenset": lambda: frozenset({"x", "y", "z"}),
    "array-int32": lambda: _C,
    "array-int32-fortran": lambda: np.asfortranarray(_C),
    "array-int32-big-endian": lambda: _C.astype(">i4"),
    "array-float64": lambda: np.linspace(-1, 1, 5),
    "array-uint8-image": lambda: np.arange(64, dtype=np.uint8).reshape(8, 8),
    "array-bool": lambda: np.array([True, False, True]),
    "array-float16": lambda: np.array([0.5, -2.0], np.float16),
    "array-complex": lambda: np.array([1 + 2j], np.complex128),
    "array-unicode": lambda: np.array(["ab", "ü"]),
    "array-empty": lambda: np.zeros((0, 3), np.float32),
    "array-0d": lambda: np.array(3.5),
    "array-strided": lambda: _C[:, ::2],
    "numpy-float32": lambda: np.float32(1.5),
    "numpy-int64": lambda: np.int64(-3),
    "numpy-uint8": lambda: np.uint8(255),
    "numpy-bool": lambda: np.bool_(True),
    "config": lambda: GoldenConfig(),
    "config-changed": lambda: GoldenConfig(size=128),
    "key": lambda: Key(bytes(range(KEY_SIZE))),
    "blob": lambda: Blob(b"an index file"),
}

#: name -> a Key computed by one of the derived key functions
GOLDEN_DERIVED: dict[str, Callable[[], Key]] = {
    "bytes_key": lambda: bytes_key(b"\x89PNG\r\n"),
    "bytes_key-empty": lambda: bytes_key(b""),
    "item_key": lambda: item_key(bytes(range(16)), [b"a" * 16, b"b" * 16]),
    "items_key": lambda: items_key(["x/1.png", "x/2.png"], [b"c" * 16, b"d" * 16]),
    "items_key-empty": lambda: items_key([], []),
}


def golden_keys() -> dict[str, str]:
    out = {name: key(make()).hex() for name, make in GOLDEN.items()}
    out.update({name: make().hex() for name, make in GOLDEN_DERIVED.items()})
    return out


# --------------------------------------------------------------------------
# golden values


def test_golden_keys_are_unchanged():
    stored = json.loads(GOLDEN_FILE.read_text())["keys"]
    computed = golden_keys()
    assert set(stored) == set(computed), "run: python tests/flow/test_keys.py --add-golden"
    changed = {n: (stored[n], computed[n]) for n in stored if stored[n] != computed[n]}
    assert not changed, f"key encoding changed (stored, now): {changed}"


def test_golden_keys_pin_the_equalities():
    stored = json.loads(GOLDEN_FILE.read_text())["keys"]
    for same in ("array-int32", "array-int32-fortran", "array-int32-big-endian"):
        assert stored[same] == stored["array-int32"]
    assert stored["float-zero"] == stored["float-negative-zero"]
    assert stored["array-strided"] == key(np.ascontiguousarray(_C[:, ::2])).hex()
    assert len(set(stored.values())) == len(stored) - 3  # otherwise all distinct


@pytest.mark.parametrize(
    "expr",
    [
        "{'b': 1, 'a': (2.0, None), 3: 'x', (1, 'k'): [b'v']}",
        "(frozenset({'alpha', 'beta', 'gamma', 'delta'}), {'x', 'y', b'x', 'z'})",
        "(np.arange(12, dtype='>f8').reshape(3, 4).T, np.float32(-0.5), -2**70, 'ü')",
    ],
)
def test_keys_are_stable_in_a_fresh_interpreter(expr):
    # check_key_stable runs with PYTHONHASHSEED=random: set and dict order must not matter
    check_key_stable(expr, expected=key(eval(expr)).hex())


# --------------------------------------------------------------------------
# the contract


def test_equal_values_give_equal_keys():
    assert key(np.arange(5)) == key(np.arange(5).copy())
    assert key({"a": [1, 2]}) == key(dict(a=[1, 2]))
    assert key(GoldenConfig()) == key(GoldenConfig(64, (0.0, 1.0), "lung"))
    assert key(bytearray(b"ab")) == key(memoryview(b"ab")) == key(b"ab")
    assert key(float("nan")) == key(-float("nan")) == key(float("inf") - float("inf"))
    assert isinstance(key(1), Key) and len(key(1)) == KEY_SIZE


def test_lists_and_tuples_are_the_same_sequence():
    assert key([1, [2, 3]]) == key((1, (2, 3))) == key([1, (2, 3)])
    assert key([]) == key(())


def test_dict_and_set_order_do_not_matter():
    assert key({"a": 1, "b": 2, 3: None}) == key({3: None, "b": 2, "a": 1})
    assert key({3, 1, 2}) == key({1, 2, 3}) == key(frozenset({2, 3, 1}))


@pytest.mark.parametrize(
    "values",
    [
        (1, 1.0, True, np.int64(1), np.float64(1.0), "1", b"1", [1], np.array([1])),
        (0, 0.0, False, None, "", b"", (), {}, set(), np.array([], np.int64)),
        ("a", b"a", ["a"], {"a"}, Key(b"a" * 16), b"a" * 16, Blob(b"a")),
        (("ab", "c"), ("a", "bc"), (("a",), "b"), ("a", ("b",)), "abc"),
        ({"a": 1}, [("a", 1)], {("a", 1)}, {"a": 1.0}, {1: "a"}),
        (GoldenConfig(), GoldenConfig(size=65), dataclasses.asdict(GoldenConfig())),
        (np.zeros((2, 3)), np.zeros((3, 2)), np.zeros(6), np.zeros((2, 3), np.float32)),
        (np.array([1, 2], np.int32), np.array([1, 2], np.int64), np.array([1, 2], np.uint32)),
    ],
)
def test_different_kinds_give_different_keys(values):
    keys = [key(v) for v in values]
    assert len(set(keys)) == len(keys)


def test_0d_and_1d_arrays_differ():
    assert key(np.array(5)) != key(np.array([5]))


def test_config_name_is_part_of_the_key():
    @dataclasses.dataclass(frozen=True)
    class Other:
        size: int = 64
        window: tuple = (0.0, 1.0)
        name: str = "lung"

    assert key(Other()) != key(GoldenConfig())


@dataclasses.dataclass
class Mutable:
    x: int = 1


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (object(), "builtins.object"),
        (lambda: 1, "function"),
        (Path("a.png"), "PosixPath"),
        (Mutable(), "Mutable"),
        ([1, {"nested": object()}], "builtins.object"),
        (np.array([None, 1], dtype=object), "dtype object"),
        (type, "builtins.type"),
    ],
    ids=["object", "lambda", "path", "mutable-dataclass", "nested", "object-array", "type"],
)
def test_unknown_types_raise_a_helpful_type_error(value, named):
    with pytest.raises(TypeError, match=named) as err:
        key(value)
    assert "flow cannot key" in str(err.value)


def test_register_adds_an_encoder():
    class Point:
        def __init__(self, x: int):
            self.x = x

    with pytest.raises(TypeError, match="register an encoder"):
        key(Point(1))

    @register(Point)
    def _encode_point(value: Point, out: list) -> None:
        out.append(b"\xf0" + canonical_bytes(value.x))

    assert key(Point(1)) == key(Point(1)) != key(Point(2))
    assert key(Point(1)) != key(1)


def test_key_type():
    k = key("x")
    assert Key(k.hex()) == k and str(k) == k.hex() and repr(k) == f"Key('{k.hex()}')"
    assert k.short == k.hex()[:12]
    with pytest.raises(ValueError, match="16 bytes"):
        Key(b"short")


# --------------------------------------------------------------------------
# derived keys


def test_file_key_is_bytes_key_of_the_content(tmp_path):
    rng = np.random.default_rng(0)
    for name, size in (("empty", 0), ("small", 100), ("over-a-read", (4 << 20) + 3)):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        p = tmp_path / name
        p.write_bytes(data)
        assert file_key(str(p)) == bytes_key(data) == bytes_key(memoryview(data))
    assert bytes_key(b"x") != key(b"x")  # files and values live in different domains


def test_item_key():
    prefix, a, b = bytes(key("node")), bytes(key("a")), bytes(key("b"))
    k = item_key(prefix, [a, b])
    assert isinstance(k, Key) and k == item_key(prefix, (a, b)) == item_key(prefix, iter([a, b]))
    assert k != item_key(prefix, [b, a])
    assert k != item_key(bytes(key("other node")), [a, b])
    assert item_key(prefix, []) != item_key(prefix, [a])
    assert k != key((prefix, a, b))


def test_items_key():
    ids, ckeys = ["a.png", "b.png"], [bytes(key(1)), bytes(key(2))]
    k = items_key(ids, ckeys)
    assert k == items_key(tuple(ids), tuple(ckeys))
    assert k != items_key(ids[::-1], ckeys[::-1])  # order is part of what a set node sees
    assert k != items_key(["a.png", "c.png"], ckeys)
    assert k != items_key(ids, [ckeys[0], bytes(key(3))])
    assert items_key(["ab"], ckeys[:1]) != items_key(["a"], ckeys[:1])
    assert items_key([], []) != items_key(["a.png"], ckeys[:1])
    with pytest.raises(ValueError):
        items_key(ids, ckeys[:1])


def _add_golden() -> int:
    doc = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.exists() else {"keys": {}}
    stored, computed = doc["keys"], golden_keys()
    changed = [n for n in stored if n in computed and stored[n] != computed[n]]
    if changed:
        print(f"refusing: existing golden keys changed: {changed}", file=sys.stderr)
        return 1
    doc = {
        "about": "key(value).hex() for the cases in tests/test_keys.py; never edit by hand",
        "keys": {**stored, **{n: k for n, k in computed.items() if n not in stored}},
    }
    GOLDEN_FILE.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(doc['keys']) - len(stored)} golden keys added")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--add-golden"]:
        sys.exit(_add_golden())
    sys.exit("usage: python tests/flow/test_keys.py --add-golden")


@pytest.mark.parametrize(
    "value",
    [
        np.arange(4096, dtype=np.float32),  # an item output: keyed by the array fast path
        np.arange(300_000, dtype=np.float64),  # over 1 MiB: the hasher is fed twice
        np.arange(12, dtype=">i4").reshape(3, 4),  # a byte swap first
        np.arange(12, dtype=np.int16).reshape(3, 4)[:, ::2],  # not contiguous
        np.zeros((0, 5), np.float32),
        np.float32(2.5).reshape(()),
        {"hist": np.arange(16, dtype=np.float32), "n": 4096},
        {"big": np.zeros(200_000), "small": np.arange(3)},
    ],
)
def test_key_hashes_the_canonical_bytes(value):
    """However a value is fed to BLAKE3 (one call, or the array's buffer apart), its
    key is the hash of the domain and its canonical bytes."""
    from blake3 import blake3

    from flow.keys import _DOMAIN

    assert bytes(key(value)) == blake3(_DOMAIN + canonical_bytes(value)).digest(KEY_SIZE)
