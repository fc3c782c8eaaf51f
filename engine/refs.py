"""What travels between the builder and its tasks: small, named records.

The builder (client) sends each task *where* its inputs are, never the inputs
themselves; a task sends back the manifests of what it wrote.  Every record is
a NamedTuple -- cheap to pickle to a Dask worker, and its fields have names:

* a **reference** says where one value is: a source file (:class:`FileRef`,
  with the key the build planned with, so a file rewritten mid-build is
  caught), a small value from the project (:class:`ValueRef`, an item's
  labels), an item in a stored pack (:class:`PackRef`), or a set step's stored
  output (:class:`ObjectRef`);
* a :class:`Keyed` reference pairs it with the value's content key;
* a **wire** says where a chain step's input comes from: an earlier step of
  the same chain (:class:`ChainWire`), the ``j``-th per-item input from outside
  the chain (:class:`ExtWire`), or the ``j``-th single value, such as a fitted
  model (:class:`OneWire`);
* :class:`Stored` is an output a task may find already stored (early cutoff);
* :class:`AllInput` / :class:`OneInput` are a set step's inputs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = [
    "AllInput",
    "ChainWire",
    "ExtWire",
    "FileRef",
    "Keyed",
    "ObjectRef",
    "OneInput",
    "OneWire",
    "PackRef",
    "Ref",
    "Stored",
    "ValueRef",
    "Wire",
]


class FileRef(NamedTuple):
    """A source file's bytes, re-hashed on read against ``key`` (when given)."""

    path: str
    key: bytes | None = None


class ValueRef(NamedTuple):
    """A small value the project gives (an item's labels)."""

    value: Any


class PackRef(NamedTuple):
    """Item ``pos`` of pack ``pack`` of node ``node``."""

    node: str
    pack: str
    pos: int


class ObjectRef(NamedTuple):
    """The stored output of a set step (a fitted model, an index)."""

    node: str
    rkey: bytes


Ref = FileRef | ValueRef | PackRef | ObjectRef


class Keyed(NamedTuple):
    """A reference and the content key of the value it names."""

    ckey: bytes
    ref: Ref


class ChainWire(NamedTuple):
    """Input from ``step``, an earlier step of the same chain task."""

    step: str


class ExtWire(NamedTuple):
    """The task's ``index``-th per-item input from outside the chain."""

    index: int


class OneWire(NamedTuple):
    """The task's ``index``-th single value (the same for every item)."""

    index: int


Wire = ChainWire | ExtWire | OneWire


class Stored(NamedTuple):
    """An output already in the store: its content key and where it is."""

    ckey: bytes
    pack: str
    pos: int


class AllInput(NamedTuple):
    """A set step's input over many items: their ids, content keys and references."""

    ids: list[str]
    ckeys: list[bytes]
    refs: list[Ref]


class OneInput(NamedTuple):
    """A set step's single-value input."""

    ckey: bytes
    ref: Ref
