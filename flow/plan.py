"""The planner: which node instances are stale, and why -- a pure function.

``plan(graph, items, catalogs, objects)`` looks at nothing but its
arguments: no store, no Dask, no files.  The caller loads what the store
holds into plain in-memory snapshots beforehand (:mod:`flow.snapshot`:
recipe key -> content key lookups, prior recipes, set outputs), so the
planner can be tested with dicts and re-run cheaply after every phase of a
build.  A catalog may carry a :class:`~flow.snapshot.RecipeMemo` of a step's
recipe keys derived in an earlier process, found by a BLAKE3 digest of all
their hash inputs; the planner reuses them when that digest is the same (a
no-op of a million items then hashes one buffer per step instead of a
million keys) and returns the keys it derived anew in :attr:`Plan.memos`,
for the caller to keep (``store.catalog.save_recipes``) or not.

For each item step the planner walks the items in order and derives each
recipe key from the content keys of the item's inputs (early cutoff: a
downstream key depends on what an upstream *produced*, not on how).  Each
item of each step ends in one state:

========  ===============================================================
fresh     its recipe key is stored; its content key is known
missing   its inputs are known but its recipe key is not stored: run it
failed    this recipe key failed before (deterministic nodes fail again;
          ``retry_failed=True`` turns these into missing)
blocked   an input failed or a source could not be read: nothing to run
pending   an input is itself missing or pending, so this key is unknown
          until that runs (it may turn out fresh: early cutoff)
========  ===============================================================

Missing and pending items get a reason: ``"missing"`` (never built for this
item), ``"code changed"``, ``"params changed"``, ``"input changed"``, or
``"retry"``.  Set steps have one instance; an ``"all"`` input sees the fresh
items of its upstream (failed and blocked items are left out, and counted).

Example (with plain dicts standing in for the store)::

    >>> from flow.graph import Graph
    >>> g = Graph(); _ = g.source("files")
    >>> items = ItemTable(ids=["a.png"], splits=[""], sources={"files": [b"k" * 16]})
    >>> p = plan(g, items, catalogs={}, objects={})
    >>> [Status(s).name for s in p.steps["files"].status]
    ['FRESH']
    >>> broken = ItemTable(ids=["a.png"], splits=[""], sources={"files": [None]})
    >>> [Status(s).name for s in plan(g, broken, {}, {}).steps["files"].status]
    ['BLOCKED']
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
from blake3 import blake3

from flow.graph import Graph, Step, toposort
from flow.keys import _ITEM_DOMAIN, _ITEMS_DOMAIN, KEY_SIZE, item_key, items_key, params_json
from flow.snapshot import CatalogLike, ObjectsLike, Previous

__all__ = ["ItemTable", "Plan", "Status", "StepPlan", "plan", "stale_rows"]


class Status(IntEnum):
    FRESH = 0
    MISSING = 1
    FAILED = 2
    BLOCKED = 3
    PENDING = 4


# plain ints for hot loops (an IntEnum attribute lookup costs ~5 us)
FRESH, MISSING, FAILED, BLOCKED, PENDING = 0, 1, 2, 3, 4


@dataclass
class ItemTable:
    """The items of a build, as the project's sources describe them.

    ``ids`` are unique and sorted; ``sources`` maps each per-item source step
    to one key per item (None where the source could not be read, with the
    reason in ``source_errors``); ``files`` maps each single-file source to
    its key.
    """

    ids: list[str]
    splits: list[str]
    sources: dict[str, list[bytes | None]]
    files: dict[str, bytes | None] = field(default_factory=dict)
    source_errors: dict[str, dict[int, str]] = field(default_factory=dict)
    _masks: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    def among(self, ids: frozenset[str]) -> np.ndarray:
        """Which items are in ``ids`` (a bool array, remembered per set of ids)."""
        key = ("ids", ids)
        mask = self._masks.get(key)
        if mask is None or len(mask) != len(self.ids):
            mask = np.fromiter(map(ids.__contains__, self.ids), bool, len(self.ids))
            self._masks[key] = mask
        return mask

    def in_splits(self, splits: Any) -> np.ndarray:
        """Which items have one of ``splits`` (a bool array, remembered per set)."""
        want = frozenset(splits)
        mask = self._masks.get(want)
        if mask is None or len(mask) != len(self.splits):
            mask = np.fromiter((s in want for s in self.splits), bool, len(self.splits))
            self._masks[want] = mask
        return mask


class KeyList(Sequence):
    """Keys of a step's items (every one known), held as an ``n x KEY_SIZE`` array.

    Reads like the list it stands for (indexing, iteration, ``==`` with a list);
    the ``bytes`` objects are only made when first read.  A no-op plan of a
    million items reads none of them.
    """

    __slots__ = ("_keys", "_list")

    def __init__(self, keys: np.ndarray):
        self._keys = keys
        self._list: list[bytes | None] | None = None

    def tolist(self) -> list[bytes | None]:
        if self._list is None:
            self._list = _split(self._keys.tobytes(), KEY_SIZE)  # type: ignore[assignment]  # every key is known
        return self._list  # type: ignore[return-value]  # set just above

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i):
        return self.tolist()[i]

    def __iter__(self):
        return iter(self.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, KeyList):
            other = other.tolist()
        return isinstance(other, list) and self.tolist() == other

    __hash__ = None  # type: ignore[assignment]  # unhashable, like the list it stands for

    def __repr__(self) -> str:
        return repr(self.tolist())


@dataclass
class StepPlan:
    """The state of one step: per item for item steps, one entry for set steps."""

    name: str
    kind: str
    status: np.ndarray  # int8 Status per item (one entry for set steps)
    rkeys: Sequence[bytes | None]  # a list or a KeyList
    ckeys: Sequence[bytes | None]
    reasons: list[str | None]
    excluded: int = 0  # set steps: input items left out (failed or blocked)
    members: dict[str, list[int]] = field(default_factory=dict)  # set steps: rows per input
    # the content keys as an n x KEY_SIZE array (zeros where unknown), for the next steps
    _ckm: np.ndarray | None = field(default=None, repr=False, compare=False)
    # _items_digest of row sets of this step (a build plans each segment's steps
    # several times over the same upstream plans): rows bytes -> (ids, digest)
    _digests: dict = field(default_factory=dict, repr=False, compare=False)

    def count(self, status: Status) -> int:
        return int(np.count_nonzero(np.asarray(self.status) == status))

    def counts(self) -> dict[str, int]:
        c = np.bincount(np.asarray(self.status, np.int64), minlength=len(Status))
        return {
            s.name.lower(): int(c[s])
            for s in (Status.FRESH, Status.MISSING, Status.PENDING, Status.FAILED, Status.BLOCKED)
        }

    def reason_counts(self) -> dict[str, int]:
        return dict(Counter(r for r in self.reasons if r))

    @property
    def done(self) -> bool:
        """Nothing left to run or wait for."""
        return not np.isin(np.asarray(self.status), _WAIT).any()


@dataclass
class Plan:
    steps: dict[str, StepPlan]
    order: list[str]
    #: recipe keys derived anew, to remember: node -> step -> (token, concatenated keys)
    memos: dict[str, dict[str, tuple[bytes, bytes]]] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return all(sp.done for sp in self.steps.values())

    def missing(self, step: str) -> list[int]:
        return np.flatnonzero(np.asarray(self.steps[step].status) == Status.MISSING).tolist()

    def summary(self) -> dict[str, dict[str, Any]]:
        return {
            n: {**sp.counts(), "reasons": sp.reason_counts()}
            for n, sp in self.steps.items()
            if sp.kind != "source"
        }


def _reason(step: Step, prev: Previous | None, inputs_hex: str) -> str:
    if prev is None:
        return "missing"
    node = step.node
    assert node is not None
    if prev.version != str(node.version) or prev.fingerprint != node.fingerprint:
        return "code changed"
    if prev.params != params_json(step.params):
        return "params changed"
    if prev.inputs != inputs_hex:
        return "input changed"
    return "missing"


def _plan_source(step: Step, items: ItemTable) -> StepPlan:
    if step.source in ("file", "object"):
        k = items.files.get(step.name)
        st = Status.FRESH if k is not None else Status.BLOCKED
        return StepPlan(step.name, "source", np.array([st], np.int8), [k], [k], [None])
    keys = items.sources.get(step.name)
    if keys is None or len(keys) != len(items):
        raise ValueError(f"source {step.name!r}: the item table has no keys for it")
    # the same item table plans its sources the same way every time: once per table
    # (a list compare is a C loop over the same objects: cheap; the keys may have
    # been changed in place since)
    memo = items._masks.get(("source", step.name))
    if memo is not None and memo[0] == keys:
        return memo[1]
    status = np.fromiter((k is None for k in keys), np.int8, len(keys)) * np.int8(Status.BLOCKED)
    copy = list(keys)
    sp = StepPlan(step.name, "source", status, copy, copy, [None] * len(keys))
    items._masks[("source", step.name)] = (list(keys), sp)
    return sp


_BAD = (FAILED, BLOCKED)
_WAIT = (MISSING, PENDING)


_MEMO_DOMAIN = b"flow-plan-memo-v1\x00"
_NO_KEY = bytes(KEY_SIZE)


def _key_matrix(sp: StepPlan) -> np.ndarray | None:
    """The content keys of a step as an ``n x KEY_SIZE`` array (zeros where unknown);
    None if a key is not ``KEY_SIZE`` bytes."""
    if sp._ckm is None:
        raw = b"".join(_NO_KEY if k is None else k for k in sp.ckeys)
        if len(raw) != KEY_SIZE * len(sp.ckeys):
            return None
        sp._ckm = np.frombuffer(raw, np.uint8).reshape(-1, KEY_SIZE)
    return sp._ckm


def _split(raw: bytes, width: int) -> list[bytes]:
    return [raw[o : o + width] for o in range(0, len(raw), width)]


def _recipe_keys(
    step: Step, ready: np.ndarray, done: dict[str, StepPlan], memo: Any, new: dict | None
) -> bytes:
    """The recipe keys of the ``ready`` items, concatenated: ``item_key(prefix, inputs)``
    of each (inlined), or remembered by ``memo`` for exactly the same hash inputs;
    keys derived anew go into ``new`` (step -> (token, keys))."""
    base = _ITEM_DOMAIN + bytes(step.prefix)
    r = len(ready)
    parts: list[np.ndarray] | None = [
        np.broadcast_to(np.frombuffer(base, np.uint8), (r, len(base)))
    ]
    for inp in step.inputs:
        up = done[inp.step]
        if inp.mode == "one":
            k = up.ckeys[0]
            if k is None or len(k) != KEY_SIZE:
                parts = None
                break
            parts.append(np.broadcast_to(np.frombuffer(k, np.uint8), (r, KEY_SIZE)))  # type: ignore[union-attr]  # not None in the loop
        else:
            m = _key_matrix(up)
            if m is None:
                parts = None
                break
            parts.append(m[ready])  # type: ignore[union-attr]  # not None in the loop
    if parts is None:  # keys of another size (only hand-made item tables): one by one
        out = []
        for i in ready.tolist():
            buf = base
            for inp in step.inputs:
                up = done[inp.step]
                buf += up.ckeys[0] if inp.mode == "one" else up.ckeys[i]  # type: ignore[operator]  # ready: inputs known
            out.append(blake3(buf).digest(KEY_SIZE))
        return b"".join(out)
    raw = np.concatenate(parts, axis=1).tobytes()
    w = len(raw) // r
    token = b""
    if memo is not None:
        token = blake3(_MEMO_DOMAIN + w.to_bytes(4, "little") + raw).digest()
        hit = memo.get(step.name, token, r)
        if hit is not None:
            return hit
    keys = b"".join([blake3(raw[o : o + w]).digest(KEY_SIZE) for o in range(0, len(raw), w)])
    if new is not None:
        new[step.name] = (token, keys)
    return keys


def _lookup(catalog: Any, rkm: np.ndarray) -> tuple[np.ndarray, Any]:
    """Rows of the recipe keys in a catalog (-1: not stored), and a getter of content keys."""
    if hasattr(catalog, "lookup_many"):
        return catalog.lookup_many(rkm), catalog.ckeys_of
    index = catalog.index
    rows = np.fromiter(
        (index.get(k, -1) for k in _split(rkm.tobytes(), KEY_SIZE)), np.int64, len(rkm)
    )

    def ckeys_of(rows: np.ndarray) -> np.ndarray:
        raw = b"".join([catalog.ckey(int(row)) for row in rows.tolist()])
        return np.frombuffer(raw, np.uint8).reshape(-1, KEY_SIZE)

    return rows, ckeys_of


def _failed(catalog: Any, rkm: np.ndarray) -> np.ndarray:
    if hasattr(catalog, "failed_many"):
        return np.asarray(catalog.failed_many(rkm), bool)
    failed = catalog.failed
    if not failed:
        return np.zeros(len(rkm), bool)
    return np.fromiter((k in failed for k in _split(rkm.tobytes(), KEY_SIZE)), bool, len(rkm))


def _plan_item_step(
    step: Step,
    n: int,
    done: dict[str, StepPlan],
    catalog: CatalogLike | None,
    retry_failed: bool,
    reasons: bool,
    memos: dict[str, dict[str, tuple[bytes, bytes]]],
) -> StepPlan:
    ins = [done[i.step] for i in step.inputs]
    blocked = np.zeros(n, bool)
    pending = np.zeros(n, bool)
    for up, inp in zip(ins, step.inputs):
        if inp.mode == "one":
            s = up.status[0]
            blocked |= s in _BAD
            pending |= s in _WAIT
        else:
            s = np.asarray(up.status)
            blocked |= np.isin(s, _BAD)
            pending |= np.isin(s, _WAIT)
    status = np.zeros(n, np.int8)
    status[blocked] = Status.BLOCKED
    waiting = pending & ~blocked
    status[waiting] = Status.PENDING
    why: list[str | None] = [None] * n
    for i in np.flatnonzero(waiting).tolist():
        why[i] = "input changed"
    rkeys: list[bytes | None] = [None] * n
    ckeys: list[bytes | None] = [None] * n
    ready = np.flatnonzero(~(blocked | pending))
    r = len(ready)
    if not r:
        return StepPlan(step.name, "item", status, rkeys, ckeys, why)
    memo = getattr(catalog, "recipes", None)
    new = memos.setdefault(step.node_name, {}) if memo is not None else None
    rraw = _recipe_keys(step, ready, done, memo, new)
    rkm = np.frombuffer(rraw, np.uint8).reshape(r, KEY_SIZE)
    if r == n:
        rkeys = KeyList(rkm)  # type: ignore[assignment]  # reads as the list
    else:
        for i, k in zip(ready.tolist(), _split(rraw, KEY_SIZE)):
            rkeys[i] = k
    ckm = np.zeros((n, KEY_SIZE), np.uint8)
    if catalog is not None:
        rows, ckeys_of = _lookup(catalog, rkm)
        found = rows >= 0
    else:
        found = np.zeros(r, bool)
    fresh = ready[found]
    if len(fresh):
        ckm[fresh] = ckeys_of(rows[found])
        if len(fresh) == n:
            ckeys = KeyList(ckm)  # type: ignore[assignment]  # reads as the list
        else:
            for i, k in zip(fresh.tolist(), _split(ckm[fresh].tobytes(), KEY_SIZE)):
                ckeys[i] = k
    lost = np.flatnonzero(~found)  # positions in ready
    if len(lost):
        bad = _failed(catalog, rkm[lost]) if catalog is not None else np.zeros(len(lost), bool)
        if not retry_failed:
            status[ready[lost[bad]]] = FAILED
        todo = lost if retry_failed else lost[~bad]
        retry = bad if retry_failed else np.zeros(len(todo), bool)  # failed before: "retry"
        status[ready[todo]] = MISSING
        for i, again in zip(ready[todo].tolist(), retry.tolist()):
            if again:
                why[i] = "retry"
            elif reasons and catalog is not None:
                why[i] = ("inputs", _inputs_hex(step, i, done))
            else:
                why[i] = "missing"
    sp = StepPlan(step.name, "item", status, rkeys, ckeys, why)
    sp._ckm = ckm
    return sp


def _inputs_hex(step: Step, i: int, done: dict[str, StepPlan]) -> str:
    keys = b"".join(
        done[inp.step].ckeys[0] if inp.mode == "one" else done[inp.step].ckeys[i]  # type: ignore[misc]  # known: the item ran
        for inp in step.inputs
    )
    return keys.hex()


def _plan_set_step(
    step: Step,
    items: ItemTable,
    done: dict[str, StepPlan],
    objects: ObjectsLike | None,
    retry_failed: bool,
) -> StepPlan:
    digests: list[bytes] = []
    members: dict[str, list[int]] = {}
    excluded = 0
    state = Status.FRESH
    for inp in step.inputs:
        up = done[inp.step]
        if inp.mode == "one":
            st = up.status[0]
            if st == Status.FRESH:
                digests.append(up.ckeys[0])  # type: ignore[arg-type]  # fresh: known
            elif st in (Status.FAILED, Status.BLOCKED):
                state = max(state, Status.BLOCKED)
            else:
                state = Status.PENDING
            continue
        rows = []
        ups = np.asarray(up.status)
        if inp.splits is not None:
            sel = items.in_splits(inp.splits).copy()
        else:
            sel = np.ones(len(ups), bool)
        if inp.ids is not None:
            sel &= items.among(inp.ids)
        rows_a = np.flatnonzero(sel & (ups == FRESH))
        rows = rows_a.tolist()
        bad = int(np.count_nonzero(sel & np.isin(ups, _BAD)))
        excluded += bad
        if not rows and bad:
            state = max(state, Status.BLOCKED)  # every item failed: nothing to fit on
        if np.isin(ups[sel], _WAIT).any():
            state = Status.PENDING
        members[inp.step] = rows
        digests.append(_items_digest(items.ids, rows_a, up))
    if state == Status.PENDING:
        return StepPlan(
            step.name,
            "set",
            _one(Status.PENDING),
            [None],
            [None],
            ["input changed"],
            excluded,
            members,
        )
    if state == Status.BLOCKED:
        return StepPlan(step.name, "set", _one(Status.BLOCKED), [None], [None], [None], excluded)
    rk = bytes(item_key(bytes(step.prefix), digests))
    obj = objects.get(rk) if objects is not None else None
    if obj is not None and not obj.failed:
        return StepPlan(
            step.name, "set", _one(Status.FRESH), [rk], [obj.ckey], [None], excluded, members
        )
    if obj is not None and obj.failed and not retry_failed:
        return StepPlan(
            step.name, "set", _one(Status.FAILED), [rk], [None], [None], excluded, members
        )
    if obj is not None:
        reason = "retry"
    else:
        prev = objects.previous(step.name) if objects is not None else None
        reason = _reason(step, prev, b"".join(digests).hex())
    return StepPlan(
        step.name, "set", _one(Status.MISSING), [rk], [None], [reason], excluded, members
    )


def _items_digest(ids: list[str], rows: np.ndarray, up: StepPlan) -> bytes:
    """``items_key`` of the ids and content keys of ``rows``, vectorized for ASCII ids."""
    memo = rows.tobytes()
    hit = up._digests.get(memo)
    if hit is not None and hit[0] is ids:
        return hit[1]
    digest = _items_digest_of(ids, rows, up)
    up._digests[memo] = (ids, digest)
    return digest


# the byte layout of items_key's input for a list of ids and a row set, without the
# content keys: (ids list, its length) -> rows bytes -> (buffer, positions of the keys).
# Ids and rows rarely change between plans of a long-lived process, keys do.
_LAYOUTS: dict[tuple[int, int], tuple[list[str], dict[bytes, tuple[np.ndarray, np.ndarray]]]] = {}


def _digest_layout(ids: list[str], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    k = (id(ids), len(ids))
    entry = _LAYOUTS.get(k)
    if entry is None or entry[0] is not ids:
        if len(_LAYOUTS) > 16:
            _LAYOUTS.clear()
        entry = _LAYOUTS[k] = (ids, {})
    memo = rows.tobytes()
    hit = entry[1].get(memo)
    if hit is not None:
        return hit
    n = len(rows)
    sel = ids if n == len(ids) else [ids[i] for i in rows.tolist()]
    joined = "".join(sel)
    if not joined.isascii():
        return None
    # each item is <u4 length, the id's bytes, its content key (as in items_key)
    lens = np.fromiter(map(len, sel), np.int64, n)
    off = np.zeros(n, np.int64)
    np.cumsum(4 + lens[:-1] + KEY_SIZE, out=off[1:])
    out = np.empty(int(off[-1] + 4 + lens[-1] + KEY_SIZE), np.uint8)
    out[(off[:, None] + np.arange(4)).ravel()] = lens.astype("<u4").view(np.uint8)
    raw = np.frombuffer(joined.encode("ascii"), np.uint8)
    starts = np.zeros(n, np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    out[np.repeat(off + 4 - starts, lens) + np.arange(len(raw))] = raw
    at = ((off + 4 + lens)[:, None] + np.arange(KEY_SIZE)).ravel()
    if len(entry[1]) > 8:
        entry[1].clear()
    entry[1][memo] = (out, at)
    return out, at


def _items_digest_of(ids: list[str], rows: np.ndarray, up: StepPlan) -> bytes:
    n = len(rows)
    m = _key_matrix(up)
    layout = _digest_layout(ids, rows) if n and m is not None else None
    if layout is None:
        sel = ids if n == len(ids) else [ids[i] for i in rows.tolist()]
        return items_key(sel, [up.ckeys[i] for i in rows.tolist()])
    template, at = layout
    out = template.copy()
    out[at] = m[rows].ravel()  # type: ignore[index]  # m is not None here
    return blake3(_ITEMS_DOMAIN + out.tobytes()).digest(KEY_SIZE)


def _one(status: Status) -> np.ndarray:
    return np.array([status], np.int8)


def plan(
    graph: Graph,
    items: ItemTable,
    catalogs: Mapping[str, CatalogLike],
    objects: Mapping[str, ObjectsLike],
    *,
    retry_failed: bool = False,
    reasons: bool = True,
    known: Mapping[str, StepPlan] | None = None,
) -> Plan:
    """The state of every step of ``graph`` over ``items``.

    ``catalogs`` maps a node name to what the store holds of its per-item
    outputs, ``objects`` a node name to its set outputs.  With
    ``reasons=False`` missing items are only marked "missing" (faster; a
    build doesn't need the why).  ``known``: plans of steps (by name) made
    over the same items and still current -- nothing ran for them or for
    anything upstream of them since -- taken as they are.
    """
    order = toposort(graph)
    done: dict[str, StepPlan] = {}
    memos: dict[str, dict[str, tuple[bytes, bytes]]] = {}
    n = len(items)
    for name in order:
        step = graph[name]
        if known is not None and name in known:
            done[name] = known[name]
        elif step.kind == "source":
            done[name] = _plan_source(step, items)
        elif step.kind == "item":
            cat = catalogs.get(step.node_name)
            sp = _plan_item_step(step, n, done, cat, retry_failed, reasons, memos)
            if reasons and cat is not None:
                for i, r in enumerate(sp.reasons):
                    if isinstance(r, tuple):
                        sp.reasons[i] = _reason(step, cat.previous(name, items.ids[i]), r[1])
                    elif r == "input changed" and cat.previous(name, items.ids[i]) is None:
                        sp.reasons[i] = "missing"  # waiting on a new item: never built
            done[name] = sp
        else:
            done[name] = _plan_set_step(
                step, items, done, objects.get(step.node_name), retry_failed
            )
    return Plan(done, order, {k: v for k, v in memos.items() if v})


def stale_rows(sp: StepPlan) -> Sequence[int]:
    """Rows of a step that a build would run or wait for."""
    return np.flatnonzero(np.isin(np.asarray(sp.status), _WAIT)).tolist()
