"""The builder (:mod:`engine.builder`) on the synthetic pipeline (:mod:`engine.testing`),
in this process: phases run as batched chain tasks submitted in waves, set steps
after them, early cutoff, failures (recorded, retried only when asked, ``fail_fast``),
a set step over no items, :func:`load_holdings` and the report.

Executors here are the ``sync`` one, or small test doubles of it that record what
the builder submits (the conformance of real executors is ``test_executors.py``).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.builder import NO_SPLIT_ITEMS, BuildReport, _batch_size, build, load_holdings
from engine.executors import Executor, SyncExecutor
from engine.refs import ChainWire, ExtWire, OneWire
from engine.testing import (
    CALLS,
    histogram,
    mean_histogram,
    parsed,
    synthetic_graph,
    synthetic_inputs,
    write_synthetic_files,
)
from engine.worker import run_chain, run_set
from flow import Items, node
from flow.errors import ItemError
from flow.graph import Graph, Input, cull
from store import open_store
from store.objects import read_object


class Recording(SyncExecutor):
    """``sync``, with ``n_workers`` workers as far as batch sizes go, recording every
    task: (``"chain"`` and its steps' names and item ids) or (``"set"`` and its step)."""

    def __init__(self, n_workers: int = 1):
        self.n_workers = n_workers
        self.tasks: list[tuple[str, Any, Any]] = []

    def submit(self, fn: Callable, *args: Any) -> cf.Future:
        if fn is run_set:
            self.tasks.append(("set", args[1].name, None))
        else:  # run_chain (or a test's stand-in for it)
            _, steps, items, _ones, _retry = args
            self.tasks.append(("chain", [s.name for s in steps], [it.id for it in items]))
        return super().submit(fn, *args)


class Deferred(Executor):
    """Tasks run only when waited for, one per ``wait_any``: how many the builder
    keeps in flight (submitted, not yet returned done) is then observable."""

    name = "deferred"

    def __init__(self, n_workers: int):
        self.n_workers = n_workers
        self.queue: list[tuple[cf.Future, Callable, tuple]] = []
        self.in_flight = 0
        self.most = 0

    def submit(self, fn: Callable, *args: Any) -> cf.Future:
        fut: cf.Future = cf.Future()
        self.queue.append((fut, fn, args))
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        return fut

    def wait_any(self, futures: set, timeout: float | None = None) -> tuple[set, set]:
        for i, (fut, fn, args) in enumerate(self.queue):
            if fut in futures:
                del self.queue[i]
                try:
                    fut.set_result(fn(*args))
                except Exception as e:
                    fut.set_exception(e)
                break
        done = {f for f in futures if f.done()}
        self.in_flight -= len(done)
        return done, set(futures) - done


def run(
    root: Path,
    data: Path,
    params: dict | None = None,
    executor: Executor | None = None,
    graph: Graph | None = None,
    **kw: Any,
) -> BuildReport:
    """A build of the synthetic pipeline over the files in ``data`` into ``root``."""
    st = open_store(root)
    items, sources = synthetic_inputs(data, st)
    g = graph if graph is not None else synthetic_graph(params)
    return build(g, items, sources, st, executor or SyncExecutor(), progress=False, **kw)


def stored_ids(root: Path, node_name: str) -> list[str]:
    from store.catalog import load_catalog

    return sorted(load_catalog(open_store(root), node_name, write_cache=False).ids)


# --------------------------------------------------------------------------
# phases, batches and waves


def test_batch_sizes_one_task_per_worker_for_small_builds():
    assert _batch_size([], 100, 2, None) == 50  # 2 tasks, not 7 of <= 16
    assert _batch_size([], 5, 2, None) == 3
    assert _batch_size([], 5, 1, None) == 5
    assert _batch_size([], 200, 2, None) == 25  # four tasks per worker from 16 a task
    assert _batch_size([], 10**6, 2, None) == 1000
    assert _batch_size([], 100, 2, 7) == 7  # [build] batch_size wins


def test_batch_size_hints_of_nodes_cap_unbatched_chains():
    @node(version=1, batch_size=4)
    def heavy(x):
        return x

    @node(version=1, batched=True, batch_size=4)
    def stacked(xs):
        return xs

    g = Graph()
    g.source("files")
    g.step("heavy", heavy, "files")
    g.step("stacked", stacked, "files")
    assert _batch_size([g["heavy"]], 1000, 2, None) == 4  # a hint caps the task size
    assert _batch_size([g["stacked"]], 1000, 2, None) == 125  # batched: the node splits itself
    assert _batch_size([g["heavy"]], 1000, 2, 50) == 50  # an explicit size wins


def test_a_phase_runs_as_chain_tasks_of_every_item_step_then_its_set_step(tmp_path):
    write_synthetic_files(tmp_path / "data", 40)
    ex = Recording(n_workers=2)
    rep = run(tmp_path / "store", tmp_path / "data", executor=ex)
    assert rep.ok and rep.executor == "sync"
    chain = ["parsed", "smoothed", "histogram"]
    # 40 items, 2 workers: one task of 20 per worker, each through the whole chain
    assert [(kind, what, len(ids or ())) for kind, what, ids in ex.tasks] == [
        ("chain", chain, 20),
        ("chain", chain, 20),
        ("set", "mean_histogram", 0),
    ]
    assert sorted(ex.tasks[0][2] + ex.tasks[1][2]) == [f"f{i:06d}.bin" for i in range(40)]
    for name in chain:
        r = rep.steps[name]
        assert (r.computed, r.reused, r.failed, r.tasks) == (40, 0, 0, 2), name
    assert (rep.steps["mean_histogram"].computed, rep.steps["mean_histogram"].tasks) == (1, 1)
    # one pack per step per task
    for name in chain:
        packs = [p for p in (tmp_path / "store" / "packs" / name).iterdir() if p.suffix == ".json"]
        assert len(packs) == 2, name


def test_batch_size_gives_the_number_of_tasks(tmp_path):
    write_synthetic_files(tmp_path / "data", 40)
    ex = Recording(n_workers=2)
    rep = run(tmp_path / "store", tmp_path / "data", executor=ex, batch_size=7)
    assert rep.ok
    sizes = [len(ids) for kind, _, ids in ex.tasks if kind == "chain"]
    assert sizes == [7, 7, 7, 7, 7, 5]
    assert all(r.tasks == 6 for n, r in rep.steps.items() if n != "mean_histogram")


def test_only_stale_items_are_sent(tmp_path):
    write_synthetic_files(tmp_path / "data", 20)
    assert run(tmp_path / "store", tmp_path / "data").ok
    write_synthetic_files(tmp_path / "data", 3, start=20)
    ex = Recording()
    rep = run(tmp_path / "store", tmp_path / "data", executor=ex)
    assert rep.ok
    assert ex.tasks == [
        (
            "chain",
            ["parsed", "smoothed", "histogram"],
            ["f000020.bin", "f000021.bin", "f000022.bin"],
        ),
        ("set", "mean_histogram", None),
    ]
    assert rep.steps["parsed"].computed == 3 and rep.steps["mean_histogram"].computed == 1
    # nothing stale: nothing submitted, and no step reported
    ex = Recording()
    rep = run(tmp_path / "store", tmp_path / "data", executor=ex)
    assert rep.ok and ex.tasks == [] and rep.steps == {}


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_tasks_are_submitted_in_waves_of_twice_the_workers_plus_one(tmp_path, workers):
    write_synthetic_files(tmp_path / "data", 30)
    ex = Deferred(workers)
    rep = run(tmp_path / "store", tmp_path / "data", executor=ex, batch_size=2)
    assert rep.ok
    assert rep.steps["parsed"].tasks == 15
    assert ex.most == 2 * workers + 1
    assert ex.queue == [] and ex.in_flight == 0


@node(version=1)
def distance(hist: dict, mean: np.ndarray) -> np.ndarray:
    """How far an item's histogram is from the mean one (an item step after a fit)."""
    return np.abs(hist["hist"] - mean).sum(keepdims=True)


@node(version=1, kind="set")
def farthest(distances: Items) -> dict:
    return {"id": distances.ids[int(np.argmax([d[0] for d in distances]))]}


def two_phases() -> Graph:
    """files -> parsed -> histogram -> mean_histogram; (histogram, mean) -> distance -> farthest."""
    g = Graph()
    g.source("files")
    g.step("parsed", parsed, "files")
    g.step("histogram", histogram, "parsed")
    g.step("mean_histogram", mean_histogram, "histogram")
    g.step("distance", distance, "histogram", "mean_histogram")
    g.step("farthest", farthest, "distance")
    return g


def test_phases_run_in_order_and_a_later_chain_reads_the_fit(tmp_path, monkeypatch):
    write_synthetic_files(tmp_path / "data", 12)
    seen: list[tuple] = []
    real = run_chain

    def spy(ctx, steps, items, ones, retry):
        seen.append(([s.name for s in steps], [s.wires for s in steps], [o.ref for o in ones]))
        return real(ctx, steps, items, ones, retry)

    ex = Recording(n_workers=1)
    monkeypatch.setattr("engine.builder.run_chain", spy)
    rep = run(tmp_path / "store", tmp_path / "data", executor=ex, graph=two_phases())
    assert rep.ok, rep.failures
    assert [t[0:2] for t in ex.tasks] == [
        ("chain", ["parsed", "histogram"]),
        ("set", "mean_histogram"),
        ("chain", ["distance"]),
        ("set", "farthest"),
    ]
    (_, wires1, ones1), (_, wires2, ones2) = seen
    assert wires1 == [(ExtWire(0),), (ChainWire("parsed"),)] and ones1 == []
    # the second chain reads histogram from the store, the fit as its one value
    assert wires2 == [(ExtWire(0), OneWire(0))]
    assert [(r.node, type(r).__name__) for r in ones2] == [("mean_histogram", "ObjectRef")]
    st = open_store(tmp_path / "store")
    [(rk, doc)] = _objects(st, "farthest").items()
    assert read_object(st, "farthest", rk)["id"] in {f"f{i:06d}.bin" for i in range(12)}
    assert doc["step"] == "farthest"


def _objects(st, node_name: str) -> dict[bytes, dict]:
    from store.objects import read_object_manifests

    return {bytes.fromhex(d["rkey"]): d for d in read_object_manifests(st, node_name)}


# --------------------------------------------------------------------------
# early cutoff


def test_a_parameter_that_changes_no_output_reuses_everything_downstream(tmp_path):
    """``width=1`` smooths with the identity kernel: ``work`` (more passes) changes
    the step's recipe but not its output, so ``histogram`` finds its output stored
    under the same recipe key (reused, not computed) and the fit is not rerun."""
    write_synthetic_files(tmp_path / "data", 16)
    root, data = tmp_path / "store", tmp_path / "data"
    assert run(root, data, {"smoothed": {"width": 1}}).ok
    calls = dict(CALLS)
    rep = run(root, data, {"smoothed": {"width": 1, "work": 3}})
    assert rep.ok
    assert rep.before.steps["smoothed"].reason_counts() == {"params changed": 16}
    assert rep.before.steps["histogram"].counts()["pending"] == 16
    got = {n: (r.computed, r.reused) for n, r in rep.steps.items()}
    assert got == {"parsed": (0, 16), "smoothed": (16, 0), "histogram": (0, 16)}
    assert CALLS["smoothed"] - calls.get("smoothed", 0) == 16
    assert CALLS["histogram"] == calls.get("histogram", 0)  # not one histogram computed
    assert CALLS["mean_histogram"] == calls.get("mean_histogram", 0)
    assert rep.after.done and rep.after.steps["mean_histogram"].counts()["fresh"] == 1
    # a change that does change the output is computed all the way down
    rep = run(root, data, {"smoothed": {"width": 5}})
    got = {n: (r.computed, r.reused) for n, r in rep.steps.items()}
    assert got == {
        "parsed": (0, 16),
        "smoothed": (16, 0),
        "histogram": (16, 0),
        "mean_histogram": (1, 0),
    }


# --------------------------------------------------------------------------
# failures

#: the outside world a flaky step depends on (a dict: not part of its fingerprint)
WORLD: dict[str, set[int]] = {"down": set()}


@node(version=1)
def flaky(values: np.ndarray) -> np.ndarray:
    """Fails (as a bug, not bad input) for items of the sizes in ``WORLD["down"]``."""
    if values.size in WORLD["down"]:
        raise RuntimeError("service unavailable")
    return values


def flaky_graph() -> Graph:
    g = Graph()
    g.source("files")
    g.step("parsed", parsed, "files")
    g.step("flaky", flaky, "parsed")
    g.step("histogram", histogram, "flaky")
    g.step("mean_histogram", mean_histogram, "histogram")
    return g


def test_a_failing_item_is_recorded_and_retried_only_when_asked(tmp_path, monkeypatch):
    files = write_synthetic_files(tmp_path / "data", 10)
    victim = files[6]
    victim.write_bytes(victim.read_bytes()[:100])
    monkeypatch.setitem(WORLD, "down", {100})
    root, data = tmp_path / "store", tmp_path / "data"
    rep = run(root, data, graph=flaky_graph())
    assert not rep.ok and rep.after.done
    [f] = rep.failures
    assert (f.step, f.id, f.type, f.reason, f.new, f.bad_input) == (
        "flaky", victim.name, "RuntimeError", "service unavailable", True, False)  # fmt: skip
    assert "raise RuntimeError" in f.traceback  # a bug: its traceback is kept
    assert (rep.steps["flaky"].computed, rep.steps["flaky"].failed) == (9, 1)
    assert rep.after.steps["histogram"].counts()["blocked"] == 1
    assert rep.steps["mean_histogram"].computed == 1  # fitted on the other nine
    assert victim.name not in stored_ids(root, "histogram")

    # the service is back; a plain build does not try the item again ...
    monkeypatch.setitem(WORLD, "down", set())
    ex = Recording()
    rep = run(root, data, graph=flaky_graph(), executor=ex)
    assert ex.tasks == [] and not rep.ok
    assert [(f.step, f.id, f.new) for f in rep.failures] == [("flaky", victim.name, False)]
    assert rep.failures[0].reason == "service unavailable"  # read back from the manifest
    # ... retry_failed does: it succeeds, and what follows it is built (the fit again)
    rep = run(root, data, graph=flaky_graph(), executor=ex, retry_failed=True)
    assert rep.ok, rep.failures
    assert ex.tasks[0][2] == [victim.name]
    got = {n: r.computed for n, r in rep.steps.items()}
    assert got == {"parsed": 0, "flaky": 1, "histogram": 1, "mean_histogram": 1}
    assert victim.name in stored_ids(root, "histogram")


def test_fail_fast_submits_nothing_after_the_first_failure(tmp_path):
    files = write_synthetic_files(tmp_path / "data", 30)
    files[1].write_bytes(b"BAD" + bytes(10))
    files[20].write_bytes(b"BAD" + bytes(11))  # not the same content: not the same recipe
    root, data = tmp_path / "store", tmp_path / "data"
    ex = Recording(n_workers=1)
    rep = run(root, data, executor=ex, batch_size=5, fail_fast=True)
    # one worker: three tasks in flight (2 x 1 + 1) when the first one's failure is seen
    assert [k for k, _, _ in ex.tasks] == ["chain"] * 3
    assert not rep.ok and not rep.interrupted and rep.error is None
    [f] = rep.failures
    assert (f.step, f.id, f.type) == ("parsed", "f000001.bin", "ItemError")
    assert (rep.steps["parsed"].computed, rep.steps["parsed"].failed) == (14, 1)
    assert "mean_histogram" not in rep.steps
    assert not rep.after.done and rep.after.steps["parsed"].counts()["missing"] == 15
    # without fail_fast the next build goes on: the rest, and the other bad file
    rep = run(root, data, batch_size=5)
    assert rep.after.done and rep.steps["parsed"].computed == 14
    assert {(f.id, f.new) for f in rep.failures} == {("f000001.bin", False), ("f000020.bin", True)}


def test_fail_fast_stops_before_the_set_steps_of_a_failed_phase(tmp_path):
    files = write_synthetic_files(tmp_path / "data", 6)
    files[0].write_bytes(b"BAD" + bytes(10))
    rep = run(tmp_path / "store", tmp_path / "data", fail_fast=True)
    assert [f.id for f in rep.failures] == ["f000000.bin"]
    assert rep.steps["parsed"].computed == 5 and "mean_histogram" not in rep.steps
    assert rep.after.steps["mean_histogram"].counts()["missing"] == 1


def test_a_task_that_raises_fails_its_batch_not_the_build(tmp_path, monkeypatch):
    """An exception outside a node (the store refused a write) fails the task's
    items, reported as one failure of the batch; the other tasks go on."""
    write_synthetic_files(tmp_path / "data", 8)
    real = run_chain

    def once(ctx, steps, items, ones, retry):
        if items[0].id == "f000000.bin":
            raise OSError("disk full")
        return real(ctx, steps, items, ones, retry)

    monkeypatch.setattr("engine.builder.run_chain", once)
    rep = run(tmp_path / "store", tmp_path / "data", batch_size=4)
    [f] = rep.failures
    assert (f.step, f.id, f.type) == ("parsed", "<4 items>", "OSError")
    assert f.reason == "task failed: disk full"
    # the failed task is not counted among the step's (finished) tasks
    assert rep.steps["parsed"].computed == 4 and rep.steps["parsed"].tasks == 1
    assert not rep.ok
    monkeypatch.undo()
    rep = run(tmp_path / "store", tmp_path / "data")
    assert rep.ok and rep.steps["parsed"].computed == 4  # nothing was recorded for them


# --------------------------------------------------------------------------
# set steps over no items


def test_a_set_step_over_no_items_runs_on_an_empty_input(tmp_path):
    (tmp_path / "data").mkdir()
    root = tmp_path / "store"
    rep = run(root, tmp_path / "data")
    assert rep.ok and rep.after.done
    assert {n: r.computed for n, r in rep.steps.items()} == {"mean_histogram": 1}
    st = open_store(root)
    [rk] = _objects(st, "mean_histogram")
    assert read_object(st, "mean_histogram", rk).shape == (0,)
    assert run(root, tmp_path / "data").steps == {}  # and once is enough


@node(version=1, kind="set")
def fit(values: Items) -> np.ndarray:
    if not len(values):
        raise ItemError("nothing to fit on")
    return np.mean(np.stack(list(values)), axis=0)


def test_a_fit_whose_splits_select_no_item_says_so(tmp_path):
    write_synthetic_files(tmp_path / "data", 4)  # synthetic items have no split ("")
    g = Graph()
    g.source("files")
    g.step("parsed", parsed, "files")
    g.step("fit", fit, Input("parsed", "all", ("train",)))
    root = tmp_path / "store"
    rep = run(root, tmp_path / "data", graph=g)
    [f] = rep.failures
    hint = f"({NO_SPLIT_ITEMS} 'train' it learns from)"
    assert (f.step, f.id, f.new, f.bad_input) == ("fit", "<set>", True, True)
    assert f.reason == f"nothing to fit on {hint}"
    rep = run(root, tmp_path / "data", graph=g)
    [f] = rep.failures
    assert (f.step, f.reason, f.new) == ("fit", f"nothing to fit on {hint}", False)


# --------------------------------------------------------------------------
# load_holdings and the report


def test_load_holdings_reads_the_catalogs_and_objects_of_the_graphs_nodes(tmp_path):
    write_synthetic_files(tmp_path / "data", 6)
    root = tmp_path / "store"
    g = synthetic_graph()
    g.step("parsed_twice", parsed, "files", params={"scale": 2.0})  # a second step of a node
    assert run(root, tmp_path / "data", graph=g).ok
    st = open_store(root)
    cats, objs = load_holdings(st, g)
    assert sorted(cats) == ["histogram", "parsed", "smoothed"]  # by node, not by step
    assert sorted(objs) == ["mean_histogram"]
    assert len(cats["parsed"]) == 12  # both steps' outputs
    assert sorted(set(cats["parsed"].ids)) == stored_ids(root, "smoothed")
    assert len(objs["mean_histogram"]) == 1
    # the recipe keys remembered for each step of the graph
    assert set(cats["parsed"].recipes.entries) == {"parsed", "parsed_twice"}
    # a culled graph: only its nodes, and only its steps' memos
    cats, objs = load_holdings(st, cull(g, ["parsed"]))
    assert list(cats) == ["parsed"] and objs == {}
    assert set(cats["parsed"].recipes.entries) == {"parsed"}
    # catalogs already loaded are taken as they are
    mine = cats["parsed"]
    again, _ = load_holdings(st, g, {"parsed": mine})
    assert again["parsed"] is mine and len(again["smoothed"]) == 6


def test_load_holdings_of_an_empty_store(tmp_path):
    cats, objs = load_holdings(open_store(tmp_path / "store"), synthetic_graph())
    assert {n: len(c) for n, c in cats.items()} == {"parsed": 0, "smoothed": 0, "histogram": 0}
    assert {n: len(o) for n, o in objs.items()} == {"mean_histogram": 0}


def test_the_report_as_json(tmp_path):
    files = write_synthetic_files(tmp_path / "data", 5)
    files[2].write_bytes(b"BAD" + bytes(10))
    rep = run(tmp_path / "store", tmp_path / "data")
    doc = json.loads(json.dumps(rep.to_json()))  # plain JSON, all of it
    assert list(doc) == [
        "ok", "interrupted", "error", "seconds", "executor", "steps", "failures", "before", "after"
    ]  # fmt: skip
    assert (doc["ok"], doc["interrupted"], doc["error"]) == (False, False, None)
    assert doc["executor"] == "sync"
    seconds = rep.steps["parsed"].seconds
    assert doc["steps"]["parsed"] == {
        "computed": 4, "reused": 0, "failed": 1, "seconds": seconds, "tasks": 1
    }  # fmt: skip
    assert doc["failures"] == [
        {"step": "parsed", "id": "f000002.bin", "type": "ItemError",
         "reason": "file starts with BAD", "traceback": "", "new": True, "bad_input": True}
    ]  # fmt: skip
    assert doc["before"]["parsed"] == {
        "fresh": 0, "missing": 5, "pending": 0, "failed": 0, "blocked": 0, "reasons": {"missing": 5}
    }  # fmt: skip
    assert doc["before"]["histogram"]["pending"] == 5
    assert doc["after"]["parsed"]["fresh"] == 4 and doc["after"]["parsed"]["failed"] == 1
    assert doc["after"]["histogram"]["blocked"] == 1 and "files" not in doc["after"]
    assert doc["seconds"] == round(rep.seconds, 3) and doc["seconds"] >= 0


def test_an_executor_that_dies_ends_the_build_with_a_report(tmp_path):
    write_synthetic_files(tmp_path / "data", 6)

    class Lost(SyncExecutor):
        def wait_any(self, futures, timeout=None):
            raise ConnectionError("scheduler gone")

    rep = run(tmp_path / "store", tmp_path / "data", executor=Lost())
    assert not rep.ok and "ConnectionError: scheduler gone" in rep.error
    assert [(f.step, f.type) for f in rep.failures] == [("<build>", "ConnectionError")]
    assert rep.to_json()["error"] == rep.error
    # everything the (sync) tasks published before is kept: a rerun only fits
    rep = run(tmp_path / "store", tmp_path / "data")
    assert rep.ok and {n: r.computed for n, r in rep.steps.items()} == {"mean_histogram": 1}
