"""Builds on a real Dask cluster (a ``dask scheduler`` and ``dask worker``
processes on loopback) give the same store content as a synchronous build --
also when a worker is killed mid-build, and when one joins late.

Pack ids, payload ids and timestamps differ between builds by design; recipe
keys, content keys and the values read back must not.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest

from engine.builder import build
from engine.executors import get_executor
from engine.testing import synthetic_graph, synthetic_inputs
from store import open_store
from tests.processes import (
    BUILD_TIMEOUT,
    ITEM_NODES,
    N_SLOW,
    SLOW,
    START_TIMEOUT,
    assert_same_content,
    build_here,
    count_manifests,
    manifest_pids,
    store_content,
    wait_until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

N_SAME = 300


def _watch(action: Callable[[threading.Event, dict], None]) -> tuple[threading.Thread, Any, dict]:
    """Run ``action(build_done, events)`` in a thread while the test builds."""
    done = threading.Event()
    events: dict = {}

    def run() -> None:
        try:
            action(done, events)
        except BaseException as e:  # reported by the test
            events["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, done, events


def _until_or_done(done: threading.Event, cond: Callable[[], Any], what: str) -> None:
    wait_until(lambda: done.is_set() or cond(), BUILD_TIMEOUT, what)
    if done.is_set():
        raise AssertionError(f"the build finished before {what}: make the build slower")


def test_cluster_build_equals_sync_build(cluster, reference, tmp_path):
    ref = reference(N_SAME)
    root = tmp_path / "store"
    st = open_store(root)
    items, sources = synthetic_inputs(ref.data, st)
    with get_executor(cluster.address) as ex:
        assert ex.n_workers == 2
        rep = build(synthetic_graph(), items, sources, st, ex, progress=False)
    assert rep.ok, rep.failures
    for name in ITEM_NODES:
        assert rep.steps[name].computed == N_SAME
        assert rep.steps[name].tasks > 2  # several batches, not one task
    assert rep.steps["mean_histogram"].computed == 1
    # both workers wrote packs (a manifest records the writer's pid) ...
    assert manifest_pids(root) == {w.pid for w in cluster.workers}
    # ... and the content equals the synchronous build's, value for value
    assert_same_content(store_content(st), ref.content)
    again = build_here(root, ref.data, {})
    assert again.ok
    assert all(s.computed == 0 for s in again.steps.values())
    # with nothing stale, a lazy executor never connects (a no-op build starts no cluster)
    started = []
    lazy = get_executor(cluster.address, lazy=True, on_start=started.append)
    with lazy:
        noop = build(synthetic_graph(), items, sources, st, lazy, progress=False)
    assert noop.ok and noop.executor == cluster.address and started == []


def test_worker_killed_mid_build(cluster, reference, tmp_path):
    ref = reference(N_SLOW, SLOW)
    root = tmp_path / "store"
    st = open_store(root)
    items, sources = synthetic_inputs(ref.data, st)
    n_batches = math.ceil(N_SLOW / 10)
    victim = cluster.workers[0]
    victim_addr = cluster.address_of(victim)

    def kill_when_busy(done: threading.Event, events: dict) -> None:
        _until_or_done(done, lambda: count_manifests(root, "histogram") >= 1, "a first pack")
        # kill it while it holds a task, so that task is lost and must be rerun
        _until_or_done(
            done,
            lambda: cluster.admin.processing(workers=[victim_addr]).get(victim_addr),
            "the victim to be running a task",
        )
        events["published"] = count_manifests(root, "histogram")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        events["build_running"] = not done.is_set()

    t, done, events = _watch(kill_when_busy)
    try:
        with get_executor(cluster.address) as ex:
            rep = build(synthetic_graph(SLOW), items, sources, st, ex, progress=False,
                        batch_size=10)  # fmt: skip
    finally:
        done.set()
        t.join(timeout=START_TIMEOUT)
    assert "error" not in events, events.get("error")
    assert victim.returncode == -signal.SIGKILL
    assert events["build_running"] and events["published"] < n_batches
    assert rep.ok, rep.failures
    for name in ITEM_NODES:  # every item once: nothing lost, nothing counted twice
        assert rep.steps[name].computed == N_SLOW
        assert rep.steps[name].tasks == n_batches
    assert cluster.n_workers() == 1
    assert_same_content(store_content(st), ref.content)


def test_worker_joining_mid_build(cluster, reference, tmp_path):
    ref = reference(N_SLOW, SLOW)
    root = tmp_path / "store"
    st = open_store(root)
    items, sources = synthetic_inputs(ref.data, st)
    batch = 5
    n_batches = math.ceil(N_SLOW / batch)

    def add_worker(done: threading.Event, events: dict) -> None:
        _until_or_done(done, lambda: count_manifests(root, "histogram") >= 1, "a first pack")
        events["late"] = cluster.add_worker("late")
        cluster.wait_for_workers(3)
        events["joined_at"] = count_manifests(root, "histogram")

    t, done, events = _watch(add_worker)
    try:
        with get_executor(cluster.address) as ex:
            rep = build(synthetic_graph(SLOW), items, sources, st, ex, progress=False,
                        batch_size=batch)  # fmt: skip
    finally:
        done.set()
        t.join(timeout=START_TIMEOUT)
    assert "error" not in events, events.get("error")
    assert rep.ok, rep.failures
    for name in ITEM_NODES:
        assert rep.steps[name].computed == N_SLOW
    assert_same_content(store_content(st), ref.content)
    # The client keeps 2 x workers + 1 = 5 tasks in flight; with two busy
    # workers some wait at the scheduler, and a worker that joins while that
    # is so gets one.  (On a machine so loaded that the worker came up with
    # the last few batches already running, harmless is all we can ask.)
    if events["joined_at"] <= n_batches - 6:
        assert events["late"].pid in manifest_pids(root), "the late worker got no task"


def test_small_local_builds_run_in_threads_without_a_cluster(reference, tmp_path):
    """``threads_below``: a local build with little stale work starts no Dask cluster;
    threads of this process compute it, with the content of a synchronous build."""
    ref = reference(N_SAME)
    st = open_store(tmp_path / "store")
    items, sources = synthetic_inputs(ref.data, st)
    started = []
    ex = get_executor("local", 2, lazy=True, on_start=started.append, threads_below=10 * N_SAME)
    with ex:
        rep = build(synthetic_graph(), items, sources, st, ex, progress=False)
    assert rep.ok and rep.executor == "threads"
    assert [type(e).__name__ for e in started] == ["ThreadExecutor"]
    assert_same_content(store_content(st), ref.content)
