"""One key function over canonical, type-tagged bytes.

Every identity in flow -- a node's recipe, a parameter set, a source file, a
node's output -- is a :class:`Key`: 16 bytes (128 bits) of BLAKE3 over a
canonical encoding.  There is exactly one way to turn a value into bytes, and
it is the same in every process, on every machine, forever:

* every value is written as a one-byte type tag followed by its payload;
  variable-length payloads are prefixed with their length, so no two distinct
  values share an encoding;
* mappings are written with their entries sorted by the encoded key bytes and
  sets with their elements sorted, so insertion order never matters;
* numpy arrays are written as dtype (little-endian), shape and C-ordered bytes,
  so a Fortran-ordered or big-endian copy of the same array has the same key;
* a Python ``-0.0`` is written as ``0.0`` and every NaN as one canonical NaN,
  so equal floats give equal keys (array elements are keyed by their bytes:
  an array holding ``-0.0`` and one holding ``0.0`` differ);
* lists and tuples are both "sequences" (configuration files give lists where
  code writes tuples).

There is no fallback: a value of a type without a registered encoder raises
:class:`TypeError`.  Unlike ``dask.base.tokenize`` we never pickle and never
invent a random id, because a key that differs between interpreters would
make the store useless (dask/dask#10905).

New types are added with :func:`register` (or :func:`register_lazy` for
optional libraries, resolved the first time a value of that module is seen)::

    >>> from flow.keys import key
    >>> key(("decode", 1, {"window": True})).hex()  # doctest: +SKIP
    '6c2f...'

Keys of files are computed by :func:`file_key` over the file's bytes (see
:mod:`engine.scan` for the stat cache that hashes each unchanged file once).
Per-item recipe keys are derived in bulk by :func:`item_key`, which hashes a
node-level prefix digest with the input keys -- no per-item encoding work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any

import numpy as np
from blake3 import blake3

__all__ = [
    "KEY_SIZE",
    "Key",
    "canonical_bytes",
    "file_key",
    "item_key",
    "items_key",
    "key",
    "params_json",
    "register",
    "register_lazy",
]

KEY_SIZE = 16
_DOMAIN = b"flow-key-v1\x00"
_FILE_DOMAIN = b"flow-file-v1\x00"
_ITEM_DOMAIN = b"flow-item-v1\x00"


class Key(bytes):
    """A 16-byte content key; prints as 32 hex digits."""

    __slots__ = ()

    def __new__(cls, value: bytes | str) -> Key:
        if isinstance(value, str):
            value = bytes.fromhex(value)
        if len(value) != KEY_SIZE:
            raise ValueError(f"a key is {KEY_SIZE} bytes, got {len(value)}")
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"Key('{self.hex()}')"

    def __str__(self) -> str:
        return self.hex()

    @property
    def short(self) -> str:
        """The first 12 hex digits, for humans."""
        return self.hex()[:12]


# --------------------------------------------------------------------------
# encoders

Encoder = Callable[[Any, list], None]
_encoders: dict[type, Encoder] = {}
_lazy: dict[str, Callable[[], None]] = {}


def register(*types: type) -> Callable[[Encoder], Encoder]:
    """Register ``fn(value, out)`` as the encoder of ``types``.

    The encoder appends bytes to the list ``out``; it must start with a tag
    byte that no other encoder uses, and must length-prefix anything of
    variable length (use :func:`_encode` for nested values).
    """

    def deco(fn: Encoder) -> Encoder:
        for t in types:
            _encoders[t] = fn
        _dispatch.cache_clear()
        return fn

    return deco


def register_lazy(module: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Register a function that registers encoders for ``module``'s types.

    It runs the first time a value whose type lives in ``module`` is keyed, so
    optional libraries are never imported just to be ready for them.
    """

    def deco(fn: Callable[[], None]) -> Callable[[], None]:
        _lazy[module] = fn
        return fn

    return deco


def _length(n: int) -> bytes:
    return struct.pack("<Q", n)


@lru_cache(maxsize=512)
def _dispatch(cls: type) -> Encoder:
    for base in cls.__mro__:
        fn = _encoders.get(base)
        if fn is not None:
            return fn
    top = cls.__module__.partition(".")[0]
    if top in _lazy:
        _lazy.pop(top)()
        _dispatch.cache_clear()
        return _dispatch(cls)
    if dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]  # set by @dataclass
        return _encode_config
    raise TypeError(
        f"flow cannot key a value of type {cls.__module__}.{cls.__qualname__}: "
        "keys are only defined for None, bool, int, float, str, bytes, sequences, "
        "mappings, sets, numpy arrays and scalars, frozen dataclass configs and Keys; "
        "register an encoder with flow.keys.register"
    )


def _encode(value: Any, out: list) -> None:
    _dispatch(type(value))(value, out)  # type: ignore[arg-type]  # a type is hashable


@register(type(None))
def _encode_none(value: None, out: list) -> None:
    out.append(b"N")


@register(bool)
def _encode_bool(value: bool, out: list) -> None:
    out.append(b"T" if value else b"F")


@register(int)
def _encode_int(value: int, out: list) -> None:
    n = (value.bit_length() + 8) // 8
    raw = value.to_bytes(n, "little", signed=True)
    out.append(b"i" + _length(n) + raw)


_NAN = struct.pack("<d", math.nan)


@register(float)
def _encode_float(value: float, out: list) -> None:
    if value != value:
        raw = _NAN
    else:
        raw = struct.pack("<d", value + 0.0)  # -0.0 + 0.0 == 0.0
    out.append(b"f" + raw)


@register(str)
def _encode_str(value: str, out: list) -> None:
    # surrogateescape: a file name that isn't UTF-8 (legal on Linux) still keys
    raw = value.encode("utf-8", "surrogateescape")
    out.append(b"s" + _length(len(raw)) + raw)


@register(bytes, bytearray, memoryview)
def _encode_bytes(value: Any, out: list) -> None:
    if type(value) is Key:
        out.append(b"K" + bytes(value))
        return
    raw = bytes(value)
    out.append(b"b" + _length(len(raw)) + raw)


register(Key)(_encode_bytes)


@register(list, tuple)
def _encode_sequence(value: Iterable, out: list) -> None:
    items = list(value)
    out.append(b"l" + _length(len(items)))
    for item in items:
        _encode(item, out)


def _encoded(value: Any) -> bytes:
    out: list = []
    _encode(value, out)
    return b"".join(out)  # joins memoryviews too


@register(dict)
def _encode_mapping(value: Mapping, out: list) -> None:
    entries = sorted((_encoded(k), _encoded(v)) for k, v in value.items())
    out.append(b"d" + _length(len(entries)))
    for k, v in entries:
        out.append(k)
        out.append(v)


@register(set, frozenset)
def _encode_set(value: Iterable, out: list) -> None:
    items = sorted(_encoded(v) for v in value)
    out.append(b"S" + _length(len(items)))
    out.extend(items)


def _canonical_dtype(dtype: np.dtype) -> np.dtype:
    if dtype.hasobject:
        raise TypeError("flow cannot key numpy arrays of dtype object")
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and np.little_endian is False):
        return dtype.newbyteorder("<")
    return dtype


@register(np.ndarray)
def _encode_array(value: np.ndarray, out: list) -> None:
    dtype = _canonical_dtype(value.dtype)
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)
    arr = np.require(value, dtype=dtype, requirements="C")
    dstr = dtype.str.encode()
    out.append(b"a" + _length(len(dstr)) + dstr + _length(arr.ndim))
    out.append(struct.pack(f"<{arr.ndim}Q", *arr.shape))
    out.append(_length(arr.nbytes))
    # the array's own buffer, not a copy: key() feeds it to the hasher as is
    out.append(arr.data.cast("B") if arr.nbytes else b"")


@register(np.generic)
def _encode_numpy_scalar(value: np.generic, out: list) -> None:
    dtype = _canonical_dtype(value.dtype)
    dstr = dtype.str.encode()
    raw = np.asarray(value, dtype=dtype).tobytes()
    out.append(b"g" + _length(len(dstr)) + dstr + _length(len(raw)) + raw)


def _encode_config(value: Any, out: list) -> None:
    cls = type(value)
    name = getattr(cls, "__flow_name__", f"{cls.__module__}.{cls.__qualname__}")
    fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    out.append(b"c")
    _encode_str(name, out)
    _encode_mapping(fields, out)


# --------------------------------------------------------------------------
# public functions


def canonical_bytes(value: Any) -> bytes:
    """The canonical, type-tagged encoding of ``value`` (what :func:`key` hashes)."""
    return _encoded(value)


def key(value: Any) -> Key:
    """The 128-bit content key of ``value``.

    Equal values of the same kind give equal keys in every process; values of
    different kinds (``1`` and ``1.0``, ``"a"`` and ``b"a"``) give different
    keys; unknown types raise :class:`TypeError`.
    """
    out: list = [_DOMAIN]
    _encode(value, out)
    h = blake3()
    small: list = []
    for part in out:  # big buffers (arrays) go to the hasher without a copy
        if len(part) > 4096:
            if small:
                h.update(b"".join(small))
                small = []
            h.update(part)
        else:
            small.append(part)
    if small:
        h.update(b"".join(small))
    return Key(h.digest(KEY_SIZE))


def item_key(prefix: bytes, inputs: Iterable[bytes]) -> Key:
    """The recipe key of one item of a per-item node.

    ``prefix`` is the node-level digest (name, version, code fingerprint and
    parameters, computed once by :func:`key`); ``inputs`` are the item's input
    keys, in the node's argument order.  Every input is exactly
    :data:`KEY_SIZE` bytes and the number of inputs is fixed by the node, so
    the concatenation is unambiguous.
    """
    h = blake3(_ITEM_DOMAIN)
    h.update(prefix)
    for k in inputs:
        h.update(k)
    return Key(h.digest(KEY_SIZE))


def bytes_key(data: bytes | memoryview) -> Key:
    """The key of a source's bytes: what :func:`file_key` computes for a file."""
    h = blake3(_FILE_DOMAIN)
    h.update(data)
    return Key(h.digest(KEY_SIZE))


def file_key(path: str) -> Key:
    """The key of a file's bytes (BLAKE3, streamed; no stat cache here)."""
    h = blake3(_FILE_DOMAIN)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return Key(h.digest(KEY_SIZE))


_ITEMS_DOMAIN = b"flow-items-v1\x00"


def items_key(ids: Iterable[str], ckeys: Iterable[bytes]) -> Key:
    """The key of a set of items as a set node sees it: ids and content keys, in order."""
    ids, ckeys = list(ids), list(ckeys)
    if len(ids) != len(ckeys):
        raise ValueError("items_key needs one content key per id")
    pack = struct.Struct("<I").pack
    raws = [i.encode("utf-8", "surrogateescape") for i in ids]
    buf = b"".join([b"".join((pack(len(r)), r, c)) for r, c in zip(raws, ckeys)])
    return Key(blake3(_ITEMS_DOMAIN + buf).digest(KEY_SIZE))


def params_json(params: Any) -> str:
    """Parameters as canonical JSON (how manifests record them)."""

    def untuple(v: Any) -> Any:
        return [untuple(x) for x in v] if isinstance(v, tuple | list) else v

    d = params if isinstance(params, dict) else dataclasses.asdict(params)
    return json.dumps({k: untuple(v) for k, v in d.items()}, sort_keys=True, separators=(",", ":"))
