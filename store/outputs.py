"""What a node's output looks like when stored, and what produced it.

Output values are brought to a canonical form before they are keyed and
stored (:func:`canonical_output`): a numpy array, a :class:`~flow.values.Blob`,
or a flat dict of those and small JSON-able attributes -- so what is read
back keys the same.  A :class:`Recipe` is the node-level part of every item's
recipe (node, version, fingerprint, parameters, key prefix), written into
each manifest with the :func:`environment` (library versions, host); an
:class:`ItemResult` is one item's outcome as a task hands it to the writer.
"""

from __future__ import annotations

import contextlib
import math
import platform
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from flow.values import Blob
from store.host import hostname

__all__ = ["ItemResult", "Recipe", "canonical_output", "environment"]


_BARE = "_"  # field name of a node output that is a bare array


_ATTR_TYPES = (str, int, float, bool, type(None))


def _canonical_attr(value: Any, where: str) -> Any:
    if isinstance(value, _ATTR_TYPES):
        if isinstance(value, float) and not math.isfinite(value):
            raise TypeError(f"{where}: non-finite float {value!r} cannot be stored as an attr")
        return value
    if isinstance(value, list | tuple):
        return tuple(_canonical_attr(v, where) for v in value)
    raise TypeError(
        f"{where}: a node output value must be a numpy array, a Blob, or str/int/float/"
        f"bool/None (or tuples of them), not {type(value).__name__}"
    )


def canonical_output(value: Any, *, node: str = "node", allow_blobs: bool = True) -> Any:
    """The canonical form of a node's return value (what is keyed and stored).

    numpy scalars become 0-d arrays, lists become tuples, arrays become
    C-contiguous; anything else raises :class:`TypeError` naming the node.
    """
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"node {node!r} returned an array of dtype object")
        if value.dtype.kind in "USV":
            raise TypeError(
                f"node {node!r} returned an array of dtype {value.dtype}: strings are stored "
                "as attrs (return a tuple of str), arrays must be numeric or bool"
            )
        return np.require(value, requirements="C")
    if isinstance(value, Blob):
        if not allow_blobs:
            raise TypeError(f"node {node!r}: item nodes cannot return Blobs; return an array")
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not k or k.startswith(("_", ".")) or "/" in k:
                raise TypeError(
                    f"node {node!r}: output field names must be non-empty strings without "
                    f"'/' that don't start with '_' or '.', got {k!r}"
                )
            if isinstance(v, np.ndarray | np.generic | Blob):
                out[k] = canonical_output(v, node=node, allow_blobs=allow_blobs)
            else:
                out[k] = _canonical_attr(v, f"node {node!r} field {k!r}")
        return out
    raise TypeError(
        f"node {node!r} returned {type(value).__name__}; a node returns a numpy array, a Blob, "
        "or a dict of arrays, Blobs and small JSON-able values"
    )


def _split(value: Any) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Blob]]:
    if isinstance(value, np.ndarray):
        return {_BARE: value}, {}, {}
    if isinstance(value, Blob):
        return {}, {}, {_BARE: value}
    arrays = {k: v for k, v in value.items() if isinstance(v, np.ndarray)}
    blobs = {k: v for k, v in value.items() if isinstance(v, Blob)}
    attrs = {k: v for k, v in value.items() if k not in arrays and k not in blobs}
    return arrays, attrs, blobs


def _untuple(v: Any) -> Any:
    return [_untuple(x) for x in v] if isinstance(v, tuple) else v


def _retuple(v: Any) -> Any:
    """JSON lists back to the tuples they were (nested)."""
    if not isinstance(v, list):
        return v
    if not any(isinstance(x, list) for x in v):  # flat (an index's 100k ids): one copy
        return tuple(v)
    return tuple(_retuple(x) for x in v)


@dataclass(frozen=True)
class Recipe:
    """What produced a pack or object: the node-level part of every item's recipe."""

    node: str
    step: str
    version: int | str
    fingerprint: str
    params: dict
    prefix: str  # hex of the node-level key (name, version, fingerprint, params)

    def to_json(self) -> dict:
        return {
            "node": self.node,
            "step": self.step,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "params": {k: _untuple(v) for k, v in self.params.items()},
            "prefix": self.prefix,
        }


@lru_cache(maxsize=1)
def environment() -> dict:
    """Library versions and host, recorded in every manifest (not in keys)."""
    import importlib.metadata as md

    libs = {}
    for name in (
        "numpy",
        "zarr",
        "dask",
        "distributed",
        "pydicom",
        "Pillow",
        "scikit-image",
        "scikit-learn",
        "torch",
        "onnxruntime",
        "annoy",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            libs[name] = md.version(name)
    libs["python"] = platform.python_version()
    return {"libs": libs, "host": hostname()}


@dataclass
class ItemResult:
    """One item's outcome, as a task hands it to :func:`write_pack`."""

    id: str
    rkey: bytes
    inputs: tuple[bytes, ...]
    value: Any = None  # canonical output, when it succeeded
    ckey: bytes | None = None
    error: dict | None = None  # {"type", "reason", "traceback"} when it failed
    seconds: float = 0.0
