"""Contained item calls (engine/sandbox.py): a node that never returns, one that
allocates without end, one that crashes -- each costs its item, the child process is
replaced, and the rest of the batch goes on."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from engine.refs import FileRef
from engine.sandbox import Limits, Sandbox, borrowed, format_size
from flow import ItemError, node


@node(version=1)
def spins(source: bytes) -> np.ndarray:
    """Never returns on b"hang"; allocates without end on b"grow"; dies on b"crash"."""
    if source == b"hang":
        while True:
            pass
    if source == b"grow":
        hoard = []
        while True:
            hoard.append(np.ones(16 << 20, np.uint8))
    if source == b"crash":
        os.abort()
    if source == b"bad":
        raise ItemError("not an image")
    return np.frombuffer(source, np.uint8).astype(np.float32)


def test_format_size():
    assert format_size(2 << 30) == "2 GiB"
    assert format_size(256 << 20) == "256 MiB"
    assert format_size(1536 << 20) == "1.5 GiB"


def test_a_node_that_never_returns_times_out_and_the_child_is_replaced():
    box = Sandbox(Limits(1.0, 0))
    try:
        v, err = box.call(spins, {}, [b"ok"], False)
        assert err is None and v.tolist() == [111.0, 107.0]
        first = box._proc.pid
        t0 = time.monotonic()
        v, err = box.call(spins, {}, [b"hang"], False)
        assert time.monotonic() - t0 < 5
        assert v is None and err["reason"] == "timed out after 1 s" and err["bad_input"]
        v, err = box.call(spins, {}, [b"ok"], False)  # a fresh child answers
        assert err is None and box._proc.pid != first and box.started == 2
    finally:
        box.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RLIMIT_AS is Linux's")
def test_a_node_that_allocates_without_end_exceeds_its_memory_limit():
    box = Sandbox(Limits(60.0, 256 << 20))
    try:
        v, err = box.call(spins, {}, [b"grow"], False)
        assert v is None and err["reason"] == "exceeded 256 MiB", err
        assert err["type"] == "ItemMemory" and err["bad_input"]
        v, err = box.call(spins, {}, [b"ok"], False)
        assert err is None and box.started == 2
    finally:
        box.close()


def test_a_crash_fails_its_item_only():
    box = Sandbox(Limits(30.0, 0))
    try:
        v, err = box.call(spins, {}, [b"crash"], False)
        assert v is None and "died (SIGABRT)" in err["reason"], err
        v, err = box.call(spins, {}, [b"bad"], False)
        assert err["reason"] == "not an image" and err["type"] == "ItemError"
        assert box.call(spins, {}, [b"ok"], False)[1] is None
    finally:
        box.close()


def test_children_are_pooled_not_piled_up():
    import threading

    seen = []

    def work():
        with borrowed(Limits(5.0, 0)) as box:
            box.call(spins, {}, [b"ok"], False)
            seen.append(box)

    for _ in range(3):
        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len({id(b) for b in seen}) <= 2  # three rounds of two threads: two children


def test_a_build_goes_on_past_a_hanging_item(tmp_path):
    """Through the engine: the hanging item fails with the reason, the others are built."""
    from engine.builder import SourceRefs, build
    from engine.executors import ThreadExecutor
    from flow.graph import Graph
    from flow.keys import bytes_key
    from flow.plan import ItemTable
    from store import open_store

    data = {"a": b"ab", "h": b"hang", "g": b"grow", "z": b"zz"}
    for k, v in data.items():
        (tmp_path / k).write_bytes(v)
    g = Graph()
    g.source("files", "files")
    g.step("spins", spins, "files")
    ids = sorted(data)
    keys = [bytes(bytes_key(data[i])) for i in ids]
    items = ItemTable(ids=ids, splits=[""] * 4, sources={"files": keys})
    refs = SourceRefs({"files": [FileRef(str(tmp_path / i), k) for i, k in zip(ids, keys)]})
    store = open_store(str(tmp_path / "store"))
    with ThreadExecutor(2) as ex:
        rep = build(g, items, refs, store, ex, limits=Limits(3.0, 256 << 20))
    why = {f.id: f.reason for f in rep.failures}
    assert why == {"h": "timed out after 3 s", "g": "exceeded 256 MiB"}, why
    assert rep.steps["spins"].computed == 2
    assert all(f.bad_input for f in rep.failures)
