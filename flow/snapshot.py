"""What the planner reads of a store: plain, in-memory records.

The planner (:mod:`flow.plan`) does no I/O.  Whoever calls it -- the engine's
builder, the application's ``status`` -- first loads what the store holds into
the shapes below (``store.catalog`` does it for a real store; tests use dicts),
then hands them over.  The core defines the shapes and the store fills them,
so the store depends on the core and never the other way round.

* a **catalog** of a node's per-item outputs (:class:`CatalogLike`): which
  recipe keys are stored and their content keys, which failed, and the recipe
  each item was last built with (:class:`Previous`, for "why is it stale?");
* the node's **objects**, its set outputs (:class:`ObjectsLike`), one
  :class:`ObjectState` per stored recipe key;
* a catalog may carry a :class:`RecipeMemo`: recipe keys the planner derived in
  an earlier process, found again by a digest of all their hash inputs.  The
  planner only reads it; the new entries it derives come back in
  :attr:`flow.plan.Plan.memos`, and the caller decides whether to keep them
  (``store.catalog.save_recipes``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

from flow.keys import KEY_SIZE

__all__ = ["CatalogLike", "ObjectState", "ObjectsLike", "Previous", "RecipeMemo"]


class Previous(NamedTuple):
    """What was last built for a (step, item): for "why is it stale?"."""

    version: str
    fingerprint: str
    params: str  # flow.keys.params_json of the parameters
    inputs: str  # hex of the input keys


class ObjectState(NamedTuple):
    """A stored set output: its content key (None if it failed) and its recipe."""

    ckey: bytes | None
    failed: bool
    step: str = ""
    created: float = 0.0
    previous: Previous | None = None
    failure: Mapping[str, Any] | None = None  # type, reason, traceback, bad_input


class CatalogLike(Protocol):
    """A node's stored per-item outputs.  ``lookup_many``/``failed_many``/``ckeys_of``
    (vectorized, on ``n x KEY_SIZE`` uint8 arrays) are used where present,
    else ``index``/``failed``/``ckey``."""

    index: Mapping[bytes, int]
    failed: Mapping[bytes, Any]

    def ckey(self, row: int) -> bytes: ...

    def previous(self, step: str, item_id: str) -> Previous | None: ...


class ObjectsLike(Protocol):
    """A node's stored set outputs."""

    def get(self, rkey: bytes) -> ObjectState | None: ...

    def previous(self, step: str) -> Previous | None: ...


class RecipeMemo:
    """Recipe keys derived earlier, per step, found again by ``token`` (a digest of
    every derived key's hash input): a disposable, in-memory cache.

    >>> memo = RecipeMemo({"s": (b"t" * 32, b"k" * 32)})
    >>> memo.get("s", b"t" * 32, 2) == b"k" * 32, memo.get("s", b"x" * 32, 2)
    (True, None)
    """

    __slots__ = ("entries",)

    def __init__(self, entries: Mapping[str, tuple[bytes, bytes]] | None = None):
        self.entries: dict[str, tuple[bytes, bytes]] = dict(entries or {})

    def get(self, step: str, token: bytes, n: int) -> bytes | None:
        """The ``n`` remembered keys (concatenated) for ``token``, or None."""
        hit = self.entries.get(step)
        if hit is not None and hit[0] == token and len(hit[1]) == n * KEY_SIZE:
            return hit[1]
        return None

    def __len__(self) -> int:
        return len(self.entries)
