"""What runs inside a task: read inputs from the store, run nodes, write outputs.

The scheduler sends two kinds of task, both plain functions of picklable
arguments, so the same code runs synchronously, on threads, and on Dask
workers anywhere that can reach the store:

* :func:`run_chain` takes a batch of items through every item step of one
  phase (say decode -> normalize -> descriptors).  Intermediate values stay
  in the task's memory; each step's results are written as one pack.  Early
  cutoff happens here too: an item whose recomputed upstream output has the
  content key it had before finds its downstream recipe key among the
  candidates the client sent, and is not recomputed.
* :func:`run_set` runs one set step over all its input items, read from the
  packs that hold them, and writes one object.

A node that raises for an item fails that item only: the error (type,
reason, traceback) is recorded in the pack's manifest and the rest of the
batch goes on.  Exceptions that are not a node's (the store refused a
write, the worker ran out of memory) fail the task, and Dask retries it.
"""

from __future__ import annotations

import json
import time
import traceback
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from engine.refs import (
    AllInput,
    ChainWire,
    ExtWire,
    FileRef,
    Keyed,
    ObjectRef,
    OneInput,
    OneWire,
    PackRef,
    Ref,
    Stored,
    ValueRef,
    Wire,
)
from flow.errors import CorruptObject, FlowError, ItemError
from flow.keys import bytes_key, item_key, key
from flow.node import Items, Node


@dataclass(frozen=True)
class TaskContext:
    """What every task needs besides its own work: where the store is.

    ``storage_options`` is the fsspec options as JSON (they may nest, e.g.
    ``client_kwargs``), so a context is hashable and one store object is
    reused per process.
    """

    store_url: str
    storage_options: str = "{}"
    progress: str = ""  # the build's progress channel (engine.progress.Channel)

    @classmethod
    def of(cls, url: str, options: dict | None = None, progress: str = "") -> TaskContext:
        return cls(url, json.dumps(options or {}, sort_keys=True), progress)

    def store(self):
        return _open_store(self.store_url, self.storage_options)


@lru_cache(maxsize=8)
def _open_store(url: str, options: str):
    from store import open_store

    return open_store(url, **json.loads(options))


@dataclass
class ChainStep:
    """One item step of a chain, as a task sees it."""

    name: str
    node: Node
    params: dict
    prefix: bytes
    wires: tuple[Wire, ...]  # one per node input
    recipe: Any  # store.outputs.Recipe
    # per-item time and memory limits (engine.sandbox): steps that read source files
    limits: Any = None


@dataclass
class ChainItem:
    """One item of a chain task."""

    id: str
    ext: list[Keyed | None]  # per external per-item input j (None: blocked)
    # per chain step: outputs already stored by recipe key, and failed recipe keys
    known: list[dict[bytes, Stored]] = field(default_factory=list)
    failed: list[set] = field(default_factory=list)


@dataclass
class ChainResult:
    manifests: list[dict]
    computed: dict[str, int]
    reused: dict[str, int]
    failed: dict[str, int]
    seconds: dict[str, float]


# --------------------------------------------------------------------------
# reading values


class Reader:
    """Reads referenced values, one open pack per (node, pack) for the task."""

    def __init__(self, store):
        self.store = store
        self.packs: dict[tuple[str, str], Any] = {}

    def read_many(self, refs: Sequence[Ref]) -> list[Any]:
        from store.packs import PackReader

        out: list[Any] = [None] * len(refs)
        by_pack: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for i, ref in enumerate(refs):
            if isinstance(ref, PackRef):
                by_pack.setdefault((ref.node, ref.pack), []).append((i, ref.pos))
            elif isinstance(ref, ValueRef):
                out[i] = ref.value
            elif isinstance(ref, FileRef):
                out[i] = _read_source(ref.path, ref.key)
            elif isinstance(ref, ObjectRef):
                out[i] = load_object(self.store, ref.node, ref.rkey)
            else:
                raise ValueError(f"unknown value reference {ref!r}")
        for (node, pack), wanted in by_pack.items():
            reader = self.packs.get((node, pack))
            try:
                if reader is None:
                    reader = self.packs[(node, pack)] = PackReader.open(self.store, node, pack)
                vals = reader.read([p for _, p in wanted])
            except CorruptObject as e:
                from store.maintenance import quarantine

                quarantine(self.store, "pack", node, pack, str(e))
                raise CorruptInput(
                    f"stored pack {node}/{pack} is corrupt ({e}); it was quarantined and the "
                    "next build recomputes its items"
                ) from e
            for (i, _), v in zip(wanted, vals):
                out[i] = v
        return out


class SourceChanged(ItemError):
    """A source file's bytes no longer match the key the build planned with (or it
    vanished).  Transient: reported, but not remembered as the item's failure --
    the next build plans with whatever the file holds then."""

    transient = True


class CorruptInput(FlowError):
    """A stored input failed its checksum; it was quarantined (the task fails)."""


def _read_source(path: str, expected: bytes | None) -> bytes:
    # the reasons name no path: they are stored with the item (in its pack's
    # manifest), and a folder may be named after a patient; the item's id leads
    # the user who has the sources to the file
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise SourceChanged("the source file disappeared during the build") from None
    except OSError as e:
        raise ItemError(f"cannot read the source file: {e.strerror or e}") from None
    if expected is not None and bytes_key(data) != expected:
        raise SourceChanged(
            "the source file changed while the build was running; the next build "
            "picks up the new content"
        )
    return data


_OBJECTS: OrderedDict[tuple[str, str, bytes], Any] = OrderedDict()
_OBJECTS_MAX = 8


def load_object(store, node: str, rkey: bytes) -> Any:
    """A set step's stored output, kept in a small per-process cache (a model or
    vocabulary is read once per worker, not once per task)."""
    from store.objects import read_object

    k = (store.url, node, bytes(rkey))
    if k in _OBJECTS:
        _OBJECTS.move_to_end(k)
        return _OBJECTS[k]
    try:
        value = read_object(store, node, rkey)
    except CorruptObject as e:
        from store.maintenance import quarantine

        quarantine(store, "object", node, bytes(rkey).hex(), str(e))
        raise CorruptInput(
            f"stored object {node}/{bytes(rkey).hex()} is corrupt ({e}); it was quarantined "
            "and the next build recomputes it"
        ) from e
    _OBJECTS[k] = value
    while len(_OBJECTS) > _OBJECTS_MAX:
        _OBJECTS.popitem(last=False)
    return value


# --------------------------------------------------------------------------
# running nodes


def _error(exc: BaseException) -> dict:
    if isinstance(exc, ItemError):
        return {
            "type": type(exc).__name__,
            "reason": exc.reason,
            "traceback": "",
            "bad_input": True,
            "transient": bool(getattr(exc, "transient", False)),
        }
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-8))
    return {
        "type": type(exc).__name__,
        "reason": str(exc) or type(exc).__name__,
        "traceback": tb,
        "bad_input": False,
    }


def _call_items(
    node: Node,
    params: dict,
    args_per_item: list[list[Any]],
    shared: tuple = (),
    limits: Any = None,
):
    """Call an item node over items; yields (value | None, error | None, seconds).

    ``shared[j]`` says argument ``j`` is one value for every item (a set
    step's output): a batched node gets it as is, not as a list.  ``limits``
    (:class:`engine.sandbox.Limits`): each item runs contained, in a child
    process with those time and memory limits.
    """
    from store.outputs import canonical_output

    if limits is not None and limits.active:
        yield from _call_contained(node, params, args_per_item, shared, limits)
        return

    def finish(raw: Any) -> Any:
        return canonical_output(raw, node=node.name, allow_blobs=False)

    if node.batched and args_per_item:
        size = node.batch_size or len(args_per_item)
        for lo in range(0, len(args_per_item), size):
            chunk = args_per_item[lo : lo + size]
            t0 = time.perf_counter()
            try:
                cols = (
                    [c[0] if j in shared else list(c) for j, c in enumerate(zip(*chunk))]
                    if chunk[0]
                    else []
                )
                outs = node.fn(*cols, **params)
                if len(outs) != len(chunk):
                    raise ValueError(
                        f"batched node {node.name!r} returned {len(outs)} outputs "
                        f"for {len(chunk)} items"
                    )
                vals = [finish(o) for o in outs]
            except Exception:
                # isolate the failing items: one call per item
                for args in chunk:
                    t1 = time.perf_counter()
                    try:
                        one = [a if j in shared else [a] for j, a in enumerate(args)]
                        v = finish(node.fn(*one, **params)[0])
                        yield v, None, time.perf_counter() - t1
                    except Exception as e:
                        yield None, _error(e), time.perf_counter() - t1
                continue
            dt = (time.perf_counter() - t0) / len(chunk)
            for v in vals:
                yield v, None, dt
        return
    for args in args_per_item:
        t0 = time.perf_counter()
        try:
            v = finish(node.fn(*args, **params))
            yield v, None, time.perf_counter() - t0
        except Exception as e:
            yield None, _error(e), time.perf_counter() - t0


def _call_contained(node: Node, params: dict, args_per_item, shared: tuple, limits: Any):
    """One item at a time in this thread's sandbox (see :mod:`engine.sandbox`)."""
    from engine.sandbox import borrowed

    with borrowed(limits) as box:
        for args in args_per_item:
            one = [a if j in shared else [a] for j, a in enumerate(args)] if node.batched else args
            t0 = time.perf_counter()
            v, err = box.call(node, params, list(one), node.batched)
            yield v, err, time.perf_counter() - t0


def run_chain(
    ctx: TaskContext,
    steps: list[ChainStep],
    items: list[ChainItem],
    ones: list[Keyed],
    retry_failed: bool = False,
) -> ChainResult:
    """Run a batch of items through a chain of item steps; write one pack per step."""
    from store.outputs import ItemResult
    from store.packs import write_pack

    store = ctx.store()
    reader = Reader(store)
    n = len(items)
    one_values: dict[int, Any] = {}
    # per chain step: ckey, where the value is (ref), the value once known
    ck: dict[str, list[bytes | None]] = {}
    refs: dict[str, list[Ref | None]] = {}
    vals: dict[str, list[Any]] = {}
    ext_vals: dict[int, list[Any]] = {}
    result = ChainResult([], {}, {}, {}, {})
    pos_of = {it.id: i for i, it in enumerate(items)}
    last_use = {}
    for si, st in enumerate(steps):
        for w in st.wires:
            if isinstance(w, ChainWire):
                last_use[w.step] = si

    def ext_value(j: int, rows: list[int]) -> dict[int, Any]:
        cache = ext_vals.setdefault(j, [None] * n)
        need = [i for i in rows if cache[i] is None]
        if need:
            got = _read_guarded(reader, [items[i].ext[j].ref for i in need])  # type: ignore[union-attr]
            for i, v in zip(need, got):
                cache[i] = v
        return {i: cache[i] for i in rows}

    for si, st in enumerate(steps):
        t_step = time.perf_counter()
        ck[st.name] = [None] * n
        refs[st.name] = [None] * n
        vals[st.name] = [None] * n
        todo: list[int] = []
        in_keys: dict[int, list[bytes]] = {}
        rkeys: dict[int, bytes] = {}
        reused = failed_n = 0
        for i, it in enumerate(items):
            keys: list[bytes] = []
            blocked = False
            for w in st.wires:
                if isinstance(w, ChainWire):
                    k = ck[w.step][i]
                elif isinstance(w, ExtWire):
                    e = it.ext[w.index]
                    k = e.ckey if e is not None else None
                else:
                    k = ones[w.index].ckey
                if k is None:
                    blocked = True
                    break
                keys.append(k)
            if blocked:
                continue
            rk = item_key(st.prefix, keys)
            hit = it.known[si].get(rk)
            if hit is not None:
                ck[st.name][i] = hit.ckey
                refs[st.name][i] = PackRef(st.node.name, hit.pack, hit.pos)
                reused += 1
            elif rk in it.failed[si] and not retry_failed:
                failed_n += 1
            else:
                todo.append(i)
                in_keys[i] = keys
                rkeys[i] = rk
        # gather input values for the items to compute
        args: dict[int, list[Any]] = {i: [] for i in todo}
        bad: dict[int, dict] = {}
        for w in st.wires:
            if isinstance(w, OneWire):
                if w.index not in one_values:
                    one_values[w.index] = reader.read_many([ones[w.index].ref])[0]
                for i in todo:
                    args[i].append(one_values[w.index])
            elif isinstance(w, ExtWire):
                got = ext_value(w.index, todo)
                for i in todo:
                    args[i].append(got[i])
            else:
                up = w.step
                need = [i for i in todo if vals[up][i] is None]
                if need:
                    loaded = _read_guarded(reader, [refs[up][i] for i in need])
                    for i, v in zip(need, loaded):
                        vals[up][i] = v
                for i in todo:
                    args[i].append(vals[up][i])
        for i in todo:
            for a in args[i]:
                if isinstance(a, _ReadFailure):
                    bad[i] = a.error
                    break
        run = [i for i in todo if i not in bad]
        results: list[ItemResult] = []
        shared = tuple(j for j, w in enumerate(st.wires) if isinstance(w, OneWire))
        calls = _call_items(st.node, st.params, [args[i] for i in run], shared, st.limits)
        for i, (v, err, dt) in zip(run, calls):
            rk = rkeys[i]
            if err is None:
                c = key(v)
                vals[st.name][i] = v
                ck[st.name][i] = c
                results.append(ItemResult(items[i].id, rk, tuple(in_keys[i]), v, c, None, dt))
            else:
                results.append(
                    ItemResult(items[i].id, rk, tuple(in_keys[i]), error=err, seconds=dt)
                )
        for i, err in bad.items():
            results.append(ItemResult(items[i].id, rkeys[i], tuple(in_keys[i]), error=err))
        if results:
            manifest = write_pack(store, st.recipe, results)
            result.manifests.append(manifest)
            for pos, r in enumerate(r for r in results if r.error is None):
                refs[st.name][pos_of[r.id]] = PackRef(st.node.name, manifest["id"], pos)
        result.computed[st.name] = sum(1 for r in results if r.error is None)
        result.failed[st.name] = failed_n + sum(1 for r in results if r.error is not None)
        result.reused[st.name] = reused
        result.seconds[st.name] = time.perf_counter() - t_step
        # drop values no later step of the chain reads
        for name in list(vals):
            if last_use.get(name, -1) <= si:
                vals[name] = [None] * n
    return result


class _ReadFailure:
    __slots__ = ("error",)

    def __init__(self, error: dict):
        self.error = error


def _read_guarded(reader: Reader, refs: list[Ref]) -> list[Any]:
    """Read values; a source that can't be read fails its item, not the task."""
    files = [i for i, r in enumerate(refs) if isinstance(r, FileRef)]
    others = [i for i, r in enumerate(refs) if not isinstance(r, FileRef)]
    out: list[Any] = [None] * len(refs)
    if others:
        for i, v in zip(others, reader.read_many([refs[i] for i in others])):
            out[i] = v
    for i in files:
        try:
            out[i] = reader.read_many([refs[i]])[0]
        except ItemError as e:
            out[i] = _ReadFailure(_error(e))
    return out


def run_set(
    ctx: TaskContext,
    step: ChainStep,
    inputs: list[AllInput | OneInput],
    digests: list[bytes],
) -> dict:
    """Run one set step and write its object; returns the object's manifest.

    ``inputs`` has one entry per node input.
    """
    from engine.progress import task_sink
    from flow.reporting import reporting
    from store.objects import write_object
    from store.outputs import ItemResult, canonical_output

    store = ctx.store()
    reader = Reader(store)
    args = []
    for inp in inputs:
        if isinstance(inp, AllInput):
            args.append(Items(inp.ids, inp.ckeys, reader.read_many(inp.refs)))
        else:
            args.append(reader.read_many([inp.ref])[0])
    rk = item_key(step.prefix, digests)
    t0 = time.perf_counter()
    try:
        with reporting(task_sink(ctx.progress, step.name)):
            out = step.node.fn(*args, **step.params)
        value = canonical_output(out, node=step.node.name)
        res = ItemResult("", rk, tuple(digests), value, key(value), None)
    except Exception as e:
        res = ItemResult("", rk, tuple(digests), error=_error(e))
    res.seconds = time.perf_counter() - t0
    return write_object(store, step.recipe, rk, digests, res)
