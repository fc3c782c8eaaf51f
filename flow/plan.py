"""The planner: which node instances are stale, and why -- a pure function.

``plan(graph, items, catalogs, objects)`` looks at nothing but its
arguments: no store, no Dask, no files.  The store side hands it plain
lookups (recipe key -> content key) that it prepared beforehand, so the
planner can be tested with dicts and re-run cheaply after every phase of a
build.

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
    >>> p.steps["files"].status
    [0]
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any, Protocol

import numpy as np
from blake3 import blake3

from flow.graph import Graph, Step, toposort
from flow.keys import _ITEM_DOMAIN, KEY_SIZE, item_key, items_key

__all__ = [
    "ItemTable",
    "Plan",
    "Previous",
    "Status",
    "StepPlan",
    "params_json",
    "plan",
]


class Status(IntEnum):
    FRESH = 0
    MISSING = 1
    FAILED = 2
    BLOCKED = 3
    PENDING = 4


# plain ints for hot loops (an IntEnum attribute lookup costs ~5 us)
FRESH, MISSING, FAILED, BLOCKED, PENDING = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Previous:
    """What was last built for a (step, item): for "why is it stale?"."""

    version: str
    fingerprint: str
    params: str  # params_json
    inputs: str  # hex of the input keys


class CatalogLike(Protocol):
    index: Mapping[bytes, int]
    failed: Mapping[bytes, Any]

    def ckey(self, row: int) -> bytes: ...

    def previous(self, step: str, item_id: str) -> Previous | None: ...


class ObjectsLike(Protocol):
    def get(self, rkey: bytes) -> Any: ...  # .ckey: bytes | None, .failed: bool

    def previous(self, step: str) -> Previous | None: ...


def params_json(params: Any) -> str:
    """Parameters as canonical JSON (how manifests record them)."""

    def untuple(v: Any) -> Any:
        return [untuple(x) for x in v] if isinstance(v, tuple | list) else v

    d = params if isinstance(params, dict) else asdict(params)
    return json.dumps({k: untuple(v) for k, v in d.items()}, sort_keys=True, separators=(",", ":"))


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

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class StepPlan:
    """The state of one step: per item for item steps, one entry for set steps."""

    name: str
    kind: str
    status: np.ndarray  # int8 Status per item (one entry for set steps)
    rkeys: list[bytes | None]
    ckeys: list[bytes | None]
    reasons: list[str | None]
    excluded: int = 0  # set steps: input items left out (failed or blocked)
    members: dict[str, list[int]] = field(default_factory=dict)  # set steps: rows per input

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
    status = np.fromiter((k is None for k in keys), np.int8, len(keys)) * np.int8(Status.BLOCKED)
    return StepPlan(step.name, "source", status, list(keys), list(keys), [None] * len(keys))


_BAD = (FAILED, BLOCKED)
_WAIT = (MISSING, PENDING)


def _plan_item_step(
    step: Step,
    n: int,
    done: dict[str, StepPlan],
    catalog: CatalogLike | None,
    retry_failed: bool,
    reasons: bool,
) -> StepPlan:
    base = _ITEM_DOMAIN + bytes(step.prefix)  # item_key(prefix, inputs), inlined
    ins = [done[i.step] for i in step.inputs]
    blocked = np.zeros(n, bool)
    pending = np.zeros(n, bool)
    cols: list[Any] = []
    for up, inp in zip(ins, step.inputs):
        if inp.mode == "one":
            s = up.status[0]
            blocked |= s in _BAD
            pending |= s in _WAIT
            cols.append(None if s != Status.FRESH else up.ckeys[0])
        else:
            s = np.asarray(up.status)
            blocked |= np.isin(s, _BAD)
            pending |= np.isin(s, _WAIT)
            cols.append(up.ckeys)
    status = np.zeros(n, np.int8)
    status[blocked] = Status.BLOCKED
    waiting = pending & ~blocked
    status[waiting] = Status.PENDING
    why: list[str | None] = [None] * n
    for i in np.flatnonzero(waiting).tolist():
        why[i] = "input changed"
    rkeys: list[bytes | None] = [None] * n
    ckeys: list[bytes | None] = [None] * n
    ready = np.flatnonzero(~(blocked | pending)).tolist()
    if not ready:
        return StepPlan(step.name, "item", status, rkeys, ckeys, why)
    if len(step.inputs) == 1 and step.inputs[0].mode != "one":
        col = cols[0]
        rks = [blake3(base + col[i]).digest(KEY_SIZE) for i in ready]
    else:
        wires = [(c, inp.mode == "one") for c, inp in zip(cols, step.inputs)]
        rks = []
        for i in ready:
            buf = base
            for c, one in wires:
                buf += c if one else c[i]
            rks.append(blake3(buf).digest(KEY_SIZE))
    index = catalog.index if catalog is not None else {}
    failed = catalog.failed if catalog is not None else {}
    for i, rk in zip(ready, rks):
        rkeys[i] = rk
        row = index.get(rk)
        if row is not None:
            ckeys[i] = catalog.ckey(row)  # type: ignore[union-attr]
        elif rk in failed and not retry_failed:
            status[i] = FAILED
        else:
            status[i] = MISSING
            if rk in failed:
                why[i] = "retry"
            elif reasons and catalog is not None:
                keys = b"".join(
                    cols[j] if inp.mode == "one" else cols[j][i]
                    for j, inp in enumerate(step.inputs)
                )
                why[i] = ("inputs", keys.hex())  # type: ignore[assignment]
            else:
                why[i] = "missing"
    return StepPlan(step.name, "item", status, rkeys, ckeys, why)


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
                digests.append(up.ckeys[0])  # type: ignore[arg-type]
            elif st in (Status.FAILED, Status.BLOCKED):
                state = max(state, Status.BLOCKED)
            else:
                state = Status.PENDING
            continue
        rows = []
        splits = set(inp.splits) if inp.splits is not None else None
        ups = np.asarray(up.status)
        if splits is not None:
            sel = np.fromiter((s in splits for s in items.splits), bool, len(items.splits))
        else:
            sel = np.ones(len(ups), bool)
        if inp.ids is not None:
            sel &= np.fromiter((i in inp.ids for i in items.ids), bool, len(items.ids))
        rows = np.flatnonzero(sel & (ups == FRESH)).tolist()
        bad = int(np.count_nonzero(sel & np.isin(ups, _BAD)))
        excluded += bad
        if not rows and bad:
            state = max(state, Status.BLOCKED)  # every item failed: nothing to fit on
        if np.isin(ups[sel], _WAIT).any():
            state = Status.PENDING
        members[inp.step] = rows
        digests.append(items_key([items.ids[i] for i in rows], [up.ckeys[i] for i in rows]))
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
) -> Plan:
    """The state of every step of ``graph`` over ``items``.

    ``catalogs`` maps a node name to what the store holds of its per-item
    outputs, ``objects`` a node name to its set outputs.  With
    ``reasons=False`` missing items are only marked "missing" (faster; a
    build doesn't need the why).
    """
    order = toposort(graph)
    done: dict[str, StepPlan] = {}
    n = len(items)
    for name in order:
        step = graph[name]
        if step.kind == "source":
            done[name] = _plan_source(step, items)
        elif step.kind == "item":
            cat = catalogs.get(step.node_name)
            sp = _plan_item_step(step, n, done, cat, retry_failed, reasons)
            if reasons and cat is not None:
                for i, r in enumerate(sp.reasons):
                    if isinstance(r, tuple):
                        sp.reasons[i] = _reason(step, cat.previous(name, items.ids[i]), r[1])
            done[name] = sp
        else:
            done[name] = _plan_set_step(
                step, items, done, objects.get(step.node_name), retry_failed
            )
    return Plan(done, order)


def stale_rows(sp: StepPlan) -> Sequence[int]:
    """Rows of a step that a build would run or wait for."""
    return np.flatnonzero(np.isin(np.asarray(sp.status), _WAIT)).tolist()
