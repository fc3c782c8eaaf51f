"""Helpers for node authors and for flow's own tests and benchmarks.

* :func:`check_node` -- the contract every node should pass: same inputs give
  the same output bytes twice (and the output is storable);
* :func:`check_key_stable` -- a value's key is the same in a fresh interpreter;
* a tiny generic pipeline (:func:`synthetic_graph`): three per-item nodes and
  one set node over small "files", used to test and benchmark the framework
  without the medical steps.  Node calls are counted in :data:`CALLS` (for
  in-process executors; across processes, count with the build report).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from flow.graph import Graph
from flow.keys import Key, key
from flow.node import Items, Node, node

CALLS: Counter = Counter()


def check_node(n: Node, *args: Any, **params: Any) -> Key:
    """Run ``n`` twice on the same inputs; assert the outputs key the same.

    Returns the output's content key.
    """
    from store.outputs import canonical_output

    p = n.params(params)
    kw = {f: getattr(p, f) for f in p.__dataclass_fields__}
    a = canonical_output(n.fn(*args, **kw), node=n.name, allow_blobs=n.kind == "set")
    b = canonical_output(n.fn(*args, **kw), node=n.name, allow_blobs=n.kind == "set")
    ka, kb = key(a), key(b)
    assert ka == kb, f"node {n.name} is not deterministic: {ka} != {kb}"
    return ka


def check_key_stable(expr: str, expected: str | None = None) -> str:
    """The key of ``eval(expr)`` computed in a fresh interpreter (hex)."""
    code = f"import numpy as np\nfrom flow.keys import key\nprint(key({expr}).hex())\n"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "random"},
    ).stdout.strip()
    if expected is not None:
        assert out == expected, f"key({expr}) is {out} in a fresh interpreter, not {expected}"
    return out


# --------------------------------------------------------------------------
# a small generic pipeline


@node(version=1)
def parsed(source: bytes, *, scale: float = 1.0) -> np.ndarray:
    """Bytes of a synthetic file as float32 values."""
    CALLS["parsed"] += 1
    if source[:3] == b"BAD":
        from flow.errors import ItemError

        raise ItemError("file starts with BAD")
    return np.frombuffer(source, dtype=np.uint8).astype(np.float32) * scale


@node(version=1)
def smoothed(values: np.ndarray, *, width: int = 3, work: int = 0) -> np.ndarray:
    """A moving average; ``work`` repeats it to make the node CPU-bound (benchmarks)."""
    CALLS["smoothed"] += 1
    kernel = np.ones(width, np.float32) / width
    out = np.convolve(values, kernel, mode="same").astype(np.float32)
    for _ in range(work):
        out = np.convolve(out, kernel, mode="same").astype(np.float32)
    return out


@node(version=1)
def histogram(values: np.ndarray, *, bins: int = 16) -> dict:
    """A normalized histogram and the value count."""
    CALLS["histogram"] += 1
    h, _ = np.histogram(values, bins=bins, range=(0.0, 255.0 * 4))
    return {"hist": (h / max(1, h.sum())).astype(np.float32), "n": int(values.size)}


@node(version=1, kind="set")
def mean_histogram(hists: Items) -> np.ndarray:
    """The mean histogram over items (a stand-in for a fit node)."""
    CALLS["mean_histogram"] += 1
    if not len(hists):
        return np.zeros(0, np.float32)
    return np.mean(np.stack([h["hist"] for h in hists]), axis=0).astype(np.float32)


def synthetic_graph(params: dict[str, dict] | None = None) -> Graph:
    """files -> parsed -> smoothed -> histogram -> mean_histogram."""
    params = params or {}
    g = Graph()
    g.source("files")
    g.step("parsed", parsed, "files", params=params.get("parsed"))
    g.step("smoothed", smoothed, "parsed", params=params.get("smoothed"))
    g.step("histogram", histogram, "smoothed", params=params.get("histogram"))
    g.step("mean_histogram", mean_histogram, "histogram", params=params.get("mean_histogram"))
    return g


def write_synthetic_files(
    folder: str | Path, n: int, size: int = 256, seed: int = 0, start: int = 0
) -> list[Path]:
    """``n`` small random files ``f000000.bin ...`` (deterministic for a seed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng((seed, i))
        p = folder / f"f{i:06d}.bin"
        p.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        out.append(p)
    return out


def synthetic_inputs(folder: str | Path, store: Any = None, include=("*.bin",)):
    """The item table and worker sources for the files under ``folder``
    (what ``Project.items`` does for a project's sources)."""
    from engine.scan import paused_gc

    with paused_gc():
        return _synthetic_inputs(folder, store, include)


def _synthetic_inputs(folder, store, include):
    from engine.builder import SourceRefs
    from engine.scan import FileRefs, StatCache, file_keys, scan_folder
    from flow.plan import ItemTable

    root = os.path.realpath(folder)
    rels, stats = scan_folder(root, include=include)
    cache = StatCache(store, root) if store is not None else None
    keys, errors, _ = file_keys(root, rels, stats, cache)
    if cache is not None:
        cache.save()
    items = ItemTable(rels, [""] * len(rels), {"files": keys}, source_errors={"files": errors})
    sources = SourceRefs({"files": FileRefs(rels, keys, root)})
    return items, sources


# --------------------------------------------------------------------------
# the executor conformance suite


def _square(x: int) -> int:
    return x * x


def _fail(message: str) -> None:
    raise ValueError(message)


def _sleep(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def _drain(executor: Any, futures: set, timeout: float = 120.0) -> list[Any]:
    """Wait for every future (in ``wait_any`` polls); their results, in completion order."""
    import time

    deadline = time.monotonic() + timeout
    out = []
    pending = set(futures)
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} tasks not done in {timeout} s"
        done, pending = executor.wait_any(pending, timeout=0.5)
        out += [executor.result(f) for f in done]
    return out


class ExecutorTests:
    """What every executor must do, the way ``store.testing.StoreTests`` checks stores.

    Subclass it in a test module and give an ``executor`` fixture (class-scoped
    where starting one is slow: a cluster, Slurm jobs); set ``inline = True`` for
    an executor that runs each task as it is submitted.  The builder relies on
    exactly these calls: ``submit``, ``wait_any`` (returning within its timeout),
    ``result`` (re-raising a task's exception), ``cancel``, ``n_workers``, and a
    build of the synthetic pipeline must store exactly what a ``sync`` build does.
    """

    inline = False

    def test_submit_and_wait_for_results(self, executor: Any) -> None:
        futs = {executor.submit(_square, i) for i in range(6)}
        assert sorted(_drain(executor, futs)) == [0, 1, 4, 9, 16, 25]

    def test_a_task_exception_is_raised_by_result(self, executor: Any) -> None:
        import pytest

        fut = executor.submit(_fail, "boom from a task")
        done: set = set()
        while not done:
            done, _ = executor.wait_any({fut}, timeout=0.5)
        with pytest.raises(ValueError, match="boom from a task"):
            executor.result(fut)

    def test_wait_any_returns_within_its_timeout(self, executor: Any) -> None:
        import time

        fut = executor.submit(_sleep, 2.0)
        t0 = time.monotonic()
        done, pending = executor.wait_any({fut}, timeout=0.1)
        waited = time.monotonic() - t0
        if self.inline:
            assert done == {fut} and not pending
        else:
            assert not done and pending == {fut} and waited < 1.5
            assert _drain(executor, {fut}) == [2.0]

    def test_cancel_and_workers(self, executor: Any) -> None:
        futs = {executor.submit(_sleep, 0.2) for _ in range(3)}
        executor.cancel(futs)  # whatever they were doing: no error
        executor.cancel(set())
        assert executor.n_workers >= 1

    def test_a_build_stores_what_a_sync_build_stores(self, executor: Any, tmp_path: Path) -> None:
        from engine.builder import build
        from engine.executors import SyncExecutor
        from store import open_store
        from store.catalog import load_catalog
        from store.objects import read_object_manifests

        write_synthetic_files(tmp_path / "data", 40)
        (tmp_path / "data" / "f000007.bin").write_bytes(b"BAD" + bytes(100))

        def content(root: Path) -> dict:
            st = open_store(root)
            out = {}
            for n in ("parsed", "smoothed", "histogram"):
                cat = load_catalog(st, n, write_cache=False)
                out[n] = {(cat.rkeys[r].tobytes(), cat.ckey(r)) for r in range(len(cat))}
            docs = read_object_manifests(st, "mean_histogram")
            out["mean_histogram"] = {(d["rkey"], d["ckey"]) for d in docs if "ckey" in d}
            return out

        def run(root: Path, ex: Any):
            st = open_store(root)
            items, sources = synthetic_inputs(tmp_path / "data", st)
            return build(synthetic_graph(), items, sources, st, ex, progress=False)

        want = run(tmp_path / "sync", SyncExecutor())
        got = run(tmp_path / "here", executor)
        assert [(f.step, f.id) for f in got.failures] == [("parsed", "f000007.bin")]
        assert got.failures[0].bad_input and not got.ok and not got.interrupted
        assert content(tmp_path / "here") == content(tmp_path / "sync")
        assert got.steps["parsed"].computed == want.steps["parsed"].computed == 39
        again = run(tmp_path / "here", executor)
        assert sum(r.computed for r in again.steps.values()) == 0
