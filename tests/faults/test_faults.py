"""Faults beyond test_kills.py: the Dask scheduler killed, a full disk, corrupted stored
bytes, a source rewritten mid-build, gc running beside builds.

Every case checks the same three things: nothing that was published is lost, nothing
incomplete reads as complete (every pack the catalog lists reads back and keys to its
content keys; ``store.maintenance.verify`` finds nothing), and the next build converges
to the content of a clean synchronous build (``reference``).

The synthetic pipeline of :mod:`engine.testing` (files -> parsed -> smoothed -> histogram
-> mean_histogram) and the helpers of ``tests/processes.py`` are reused.  Tests
marked ``xfail(strict=True)`` pin a bug found here (see RELIABILITY.md): they start
passing -- and must then be flipped -- when it is fixed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import engine.worker
from engine.builder import build
from engine.executors import get_executor
from engine.testing import (
    histogram,
    parsed,
    smoothed,
    synthetic_graph,
    synthetic_inputs,
    write_synthetic_files,
)
from flow import Blob, Items, node
from flow.graph import Graph
from flow.plan import FAILED, FRESH, plan
from store import open_store
from store.catalog import load_catalog
from store.local import LocalStore
from store.maintenance import collect, verify
from store.objects import load_objects
from tests.processes import (
    BUILD_SCRIPT,
    BUILD_TIMEOUT,
    ITEM_NODES,
    N_SLOW,
    SET_NODES,
    SLOW,
    Cluster,
    Content,
    Processes,
    _kill_group,
    assert_same_content,
    build_here,
    count_manifests,
    same_value,
    start_scheduler,
    store_content,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
PACK_DELAY = 0.2  # seconds of "slow storage" per pack: keeps a build running to be hit


# --------------------------------------------------------------------------
# helpers


def stored_ids(root: Path) -> dict[str, set[str]]:
    st = open_store(root)
    return {n: set(load_catalog(st, n, write_cache=False).ids) for n in ITEM_NODES}


def assert_intact(root: Path) -> Content:
    """Every listed pack and object reads back and keys right; verify finds nothing."""
    st = open_store(root)
    content = store_content(st)  # asserts every value keys to its content key
    problems = verify(st, repair=False)
    assert not problems, [(p.kind, p.node, p.id, p.reason) for p in problems]
    return content


def assert_contains(got: Content, want: Content) -> None:
    """``got`` holds every (rkey, ckey) pair and value of ``want`` (maybe more)."""
    for n in (*ITEM_NODES, *SET_NODES):
        missing = want.pairs[n] - got.pairs[n]
        assert not missing, f"{n}: {len(missing)} reference pairs missing"
        for rk, v in want.values[n].items():
            assert same_value(got.values[n][rk], v), f"{n}: value of {rk.hex()} differs"


def packs_by_ids(root: Path, n: str) -> dict[str, set[str]]:
    """Pack id -> item ids it holds, for node ``n``."""
    cat = load_catalog(open_store(root), n, write_cache=False)
    out: dict[str, set[str]] = {}
    for r in range(len(cat)):
        out.setdefault(cat.location(r)[0], set()).add(cat.ids[r])
    return out


def chunk_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and "/c/" in p.as_posix())


def flip_bytes(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def quarantined(root: Path) -> set[str]:
    """Ids of the manifests in quarantine/ (pack ids or object rkeys)."""
    return {p.name.split(".")[0] for p in (root / "quarantine").rglob("*.json")}


def spawn(
    procs: Processes, folder: Path, store: Path, data: Path, params: dict, executor: str, **cfg: Any
) -> subprocess.Popen:
    """The synthetic build script (tests/processes.py) in a subprocess (for fixtures
    wider than a test)."""
    script = folder / "script" / "build_script.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text(BUILD_SCRIPT)
    doc = {"store": str(store), "data": str(data), "params": params, "executor": executor, **cfg}
    return procs.start(
        [sys.executable, str(script), json.dumps(doc)], f"build-{time.monotonic_ns()}.log", cwd=REPO
    )


def wait_for_packs(proc: subprocess.Popen, root: Path, n: int, log: Callable) -> None:
    wait_until(
        lambda: proc.poll() is not None or count_manifests(root, "histogram") >= n,
        BUILD_TIMEOUT,
        f"{n} published packs",
    )
    assert proc.poll() is None, f"the build ended before it could be hit:\n{log(proc)}"


def rerun_computes_only_missing(root: Path, data: Path, params: dict, n: int) -> None:
    """A sync rerun computes exactly the items the store lacks and stays intact."""
    have = stored_ids(root)
    rep = build_here(root, data, params)
    assert rep.ok, rep.failures
    for name in ITEM_NODES:
        assert rep.steps[name].computed == n - len(have[name]), name
    assert stored_ids(root)[ITEM_NODES[-1]] == {f"f{i:06d}.bin" for i in range(n)}


# --------------------------------------------------------------------------
# 1. the dask scheduler killed -9 mid-build


@pytest.fixture(scope="module")
def scheduler_killed(tmp_path_factory, reference) -> Iterator[dict]:
    """A build on a real scheduler + 2 workers; the scheduler SIGKILLed mid-build."""
    pytest.importorskip("distributed")
    from distributed import Client

    ref = reference(N_SLOW, SLOW)
    folder = tmp_path_factory.mktemp("scheduler_killed")
    procs = Processes(folder)
    try:
        sched, addr = start_scheduler(procs, idle_timeout=300)
        admin = Client(addr, timeout="30s")
        cluster = Cluster(addr, procs, admin)
        try:
            cluster.add_worker("a")
            cluster.add_worker("b")
            cluster.wait_for_workers(2)
        finally:
            admin.close()
        root = folder / "store"
        proc = spawn(
            procs, folder, root, ref.data, SLOW, addr, batch_size=10, pack_delay=PACK_DELAY
        )
        wait_for_packs(proc, root, 2, procs.log)
        at_kill = stored_ids(root)
        os.kill(sched.pid, signal.SIGKILL)
        t0 = time.monotonic()
        try:
            proc.wait(timeout=90)
            hang = False
        except subprocess.TimeoutExpired:
            hang = True
        seconds = time.monotonic() - t0
        # a worker may finish (and publish) the task it holds; stop them before checking
        for w in cluster.workers:
            _kill_group(w)
        yield {
            "ref": ref,
            "root": root,
            "at_kill": at_kill,
            "hang": hang,
            "seconds": seconds,
            "rc": proc.returncode,
            "log": procs.log(proc),
        }
    finally:
        procs.close()


@pytest.mark.cluster
@pytest.mark.slow
def test_scheduler_killed_mid_build(scheduler_killed):
    s = scheduler_killed
    assert not s["hang"], f"the build hangs after its scheduler died:\n{s['log']}"
    assert s["rc"] != 0, s["log"]
    assert "scheduler" in s["log"].lower(), s["log"]  # the error names the lost scheduler
    root, ref = s["root"], s["ref"]
    now = stored_ids(root)
    for n in ITEM_NODES:  # nothing published is lost
        assert s["at_kill"][n] <= now[n], n
    assert 0 < len(now["histogram"]) < N_SLOW, "the scheduler was not killed midway"
    assert_intact(root)
    rerun_computes_only_missing(root, ref.data, SLOW, N_SLOW)
    assert_same_content(assert_intact(root), ref.content)


@pytest.mark.cluster
@pytest.mark.slow
def test_scheduler_killed_build_returns_a_report(scheduler_killed):
    assert '"ok": false' in scheduler_killed["log"], scheduler_killed["log"][-2000:]


# --------------------------------------------------------------------------
# 2. a full disk


def _mount_small(folder: Path, mib: int) -> Callable[[], None] | None:
    """Mount a ``mib`` MiB filesystem at ``folder``; returns its unmount, or None."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return None
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(folder)], capture_output=True
    )
    if r.returncode == 0:
        return lambda: subprocess.run(["umount", "-l", str(folder)], capture_output=True)
    image = folder.parent / "disk.img"  # a loop-mounted ext4 image
    with open(image, "wb") as f:
        f.truncate(mib << 20)
    mk = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True)
    if mk.returncode == 0:
        r = subprocess.run(["mount", "-o", "loop", str(image), str(folder)], capture_output=True)
        if r.returncode == 0:
            return lambda: subprocess.run(["umount", "-l", str(folder)], capture_output=True)
    return None


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """An 8 MiB filesystem (tmpfs, else a loop-mounted ext4 image)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    unmount = _mount_small(folder, 8)
    if unmount is None:
        pytest.skip("cannot mount a small filesystem here (needs root and tmpfs or loop ext4)")
    try:
        yield folder
    finally:
        unmount()


def _fill(folder: Path, leave: int) -> Path:
    """Write a ballast file leaving about ``leave`` bytes free on ``folder``'s filesystem."""
    ballast = folder / "ballast"
    free = shutil.disk_usage(folder).free
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return ballast


def test_full_disk_mid_build(small_disk, tmp_path):
    n, size = 60, 16384  # ~64 KiB of float32 per item and step: a few MiB in all
    data = tmp_path / "data"
    write_synthetic_files(data, n, size=size)
    ref_root = tmp_path / "ref"
    assert build_here(ref_root, data, {}, batch_size=10).ok
    want = store_content(open_store(ref_root))

    root = small_disk / "store"
    ballast = _fill(small_disk, 1_500_000)
    rep = build_here(root, data, {}, batch_size=10)
    assert not rep.ok
    assert rep.failures and all(
        f.type == "OSError" and "No space left on device" in f.reason for f in rep.failures
    ), [(f.type, f.reason) for f in rep.failures]
    have = stored_ids(root)
    assert 0 < len(have["histogram"]) < n, "the disk did not fill midway"
    assert_intact(root)  # no partial pack is listed
    # the failures are the disk's, not the items': none is recorded against an item
    st = open_store(root)
    assert all(len(load_catalog(st, s, write_cache=False).failed) == 0 for s in ITEM_NODES)

    ballast.unlink()  # free the space: the rerun computes only what is missing
    rerun_computes_only_missing(root, data, {}, n)
    assert_same_content(assert_intact(root), want)


def test_failed_write_leaves_no_temporary_file(small_disk):
    st = LocalStore(small_disk / "store")
    st.put("a.json", b"{}")
    _fill(small_disk, 0)
    with pytest.raises(OSError, match="No space left"):
        st.put("packs/n/p.json", b"x" * 1_000_000)
    assert not list((small_disk / "store" / "tmp").iterdir())


# --------------------------------------------------------------------------
# 3. corrupted stored bytes


def _distinct_packs(root: Path) -> dict[str, str]:
    """One pack per item node, each holding a different batch of items."""
    chosen: dict[str, str] = {}
    used: set[str] = set()
    for n in ITEM_NODES:
        for pid, ids in sorted(packs_by_ids(root, n).items(), key=lambda kv: min(kv[1])):
            if not ids & used:
                chosen[n] = pid
                used |= ids
                break
    assert len(chosen) == len(ITEM_NODES), "need a batch per node: use more items"
    return chosen


def test_verify_finds_and_quarantines_corrupt_chunks(reference, tmp_path):
    n = 40
    ref = reference(n)
    root = tmp_path / "store"
    assert build_here(root, ref.data, {}, batch_size=10).ok
    packs = _distinct_packs(root)
    # a flipped byte in a parsed chunk, a deleted smoothed chunk, a zeroed histogram chunk
    flip_bytes(chunk_files(root / "packs" / "parsed" / packs["parsed"])[0])
    chunk_files(root / "packs" / "smoothed" / packs["smoothed"])[0].unlink()
    [h] = chunk_files(root / "packs" / "histogram" / packs["histogram"])
    h.write_bytes(b"\0" * h.stat().st_size)
    # and a flipped byte in the set output's chunk
    [obj] = chunk_files(root / "objects" / "mean_histogram")
    flip_bytes(obj, at=0)
    st = open_store(root)

    found = verify(st, repair=False)
    got = {(p.kind, p.node, p.id): p.reason for p in found}
    assert set(got) == {("pack", k, v) for k, v in packs.items()} | {
        ("object", "mean_histogram", obj.relative_to(root).parts[2])
    }, got
    assert "checksum" in got[("pack", "parsed", packs["parsed"])]
    assert "chunk file is missing" in got[("pack", "smoothed", packs["smoothed"])]
    assert not quarantined(root)  # repair=False touches nothing

    verify(st, repair=True)
    assert quarantined(root) == {*packs.values(), obj.relative_to(root).parts[2]}
    assert all(list((root / "quarantine").rglob(f"{i}.*.reason.txt")) for i in packs.values())
    lost = {k: packs_by_ids(root, k) for k in packs}
    assert all(packs[k] not in lost[k] for k in packs)  # no longer listed
    assert verify(st, repair=False) == []

    rep = build_here(root, ref.data, {}, batch_size=10)
    assert rep.ok, rep.failures
    for k in ITEM_NODES:  # only the quarantined items, nothing else
        assert rep.steps[k].computed == 10, (k, rep.steps[k])
    assert rep.steps["mean_histogram"].computed == 1
    assert_contains(assert_intact(root), ref.content)


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_build_reading_a_corrupt_pack_quarantines_it(reference, tmp_path, damage):
    """smoothed's params change, so it re-reads parsed: the corrupt parsed pack fails its
    task with CorruptInput, is quarantined, and the next build recomputes its items."""
    n = 40
    new = {"smoothed": {"width": 5}}
    ref, want = reference(n), reference(n, new)
    root = tmp_path / "store"
    assert build_here(root, ref.data, {}, batch_size=10).ok
    victim = _distinct_packs(root)["parsed"]
    victim_ids = packs_by_ids(root, "parsed")[victim]
    chunk = chunk_files(root / "packs" / "parsed" / victim)[0]
    flip_bytes(chunk) if damage == "flip" else chunk.unlink()

    rep = build_here(root, ref.data, new, batch_size=10)
    assert not rep.ok
    [f] = rep.failures
    assert f.type == "CorruptInput" and "quarantined" in f.reason and victim in f.reason, f
    assert victim in quarantined(root)
    assert rep.steps["smoothed"].computed == n - 10
    assert not stored_ids(root)["parsed"] & victim_ids
    assert_intact(root)

    rep = build_here(root, ref.data, new, batch_size=10)
    assert rep.ok, rep.failures
    assert (rep.steps["parsed"].computed, rep.steps["smoothed"].computed) == (10, 10)
    assert_contains(assert_intact(root), want.content)


def test_corrupt_array_metadata_is_quarantined_too(reference, tmp_path):
    n = 20
    new = {"smoothed": {"width": 5}}
    ref = reference(n)
    root = tmp_path / "store"
    assert build_here(root, ref.data, {}, batch_size=10).ok
    victim = sorted(packs_by_ids(root, "parsed"))[0]
    meta = root / "packs" / "parsed" / victim / "_" / "zarr.json"
    doc = json.loads(meta.read_bytes())
    doc["shape"][0] //= 2
    meta.write_text(json.dumps(doc))
    rep = build_here(root, ref.data, new, batch_size=10)
    assert [f.type for f in rep.failures] == ["CorruptInput"], rep.failures
    assert victim in quarantined(root)
    assert build_here(root, ref.data, new, batch_size=10).ok


def test_corrupt_manifest_does_not_stop_builds(reference, tmp_path):
    n = 20
    ref = reference(n)
    root = tmp_path / "store"
    assert build_here(root, ref.data, {}, batch_size=10).ok
    victim = sorted(packs_by_ids(root, "parsed"))[0]
    path = root / "packs" / "parsed" / f"{victim}.json"
    doc = path.read_bytes()
    at = doc.index(b'"rkeys":"') + 9
    at += next(i for i, c in enumerate(doc[at:]) if c == ord("a"))
    path.write_bytes(doc[:at] + bytes([doc[at] ^ 0x10]) + doc[at + 1 :])  # one bit: a -> q
    shutil.rmtree(root / "cache" / "catalog", ignore_errors=True)  # a cache masks it
    st = open_store(root)
    problems = verify(st, repair=True)  # the pack is found and taken out of service
    assert [(p.kind, p.id) for p in problems] == [("pack", victim)]
    rep = build_here(root, ref.data, {}, batch_size=10)
    assert rep.ok and rep.steps["parsed"].computed == 10


@pytest.mark.slow
def test_set_step_reading_a_corrupt_pack_does_not_loop(spawn_build, reference, tmp_path):
    n = 20
    ref = reference(n)
    root = tmp_path / "store"
    assert build_here(root, ref.data, {}, batch_size=10).ok
    victim = sorted(packs_by_ids(root, "histogram"))[0]
    flip_bytes(chunk_files(root / "packs" / "histogram" / victim)[0])
    for m in (root / "objects" / "mean_histogram").glob("*.json"):
        m.unlink()  # the set step must run again, and read every histogram pack
    proc = spawn_build(root, ref.data, {}, "sync", batch_size=10)
    try:
        proc.wait(timeout=15)  # it takes ~2 s
    except subprocess.TimeoutExpired:
        pytest.fail(f"the build never ends:\n{spawn_build.log(proc)[-1500:]}")
    assert proc.returncode == 1 and '"ok": false' in spawn_build.log(proc)
    assert victim in quarantined(root)
    rep = build_here(root, ref.data, {}, batch_size=10)
    assert rep.ok and rep.steps["histogram"].computed == 10
    assert_contains(assert_intact(root), ref.content)


# a set node with a Blob output, read by an item node through a "one" wire


@node(version=1, kind="set")
def blob_model(hists: Items) -> dict:
    """The mean histogram, as opaque bytes (a stand-in for a trained model)."""
    mean = np.mean(np.stack([h["hist"] for h in hists]), axis=0).astype(np.float32)
    return {"model": Blob(mean.tobytes()), "n": len(hists)}


@node(version=1)
def model_score(values: np.ndarray, model: dict, *, power: float = 1.0) -> np.ndarray:
    """How far an item's values are from the model (per-item use of a set output)."""
    mean = np.frombuffer(model["model"].data, np.float32)
    return np.asarray([np.abs(values.mean() / 1000.0 - mean.mean()) ** power], np.float32)


def _blob_graph(power: float) -> Graph:
    g = Graph()
    g.source("files")
    g.step("parsed", parsed, "files")
    g.step("smoothed", smoothed, "parsed")
    g.step("histogram", histogram, "smoothed")
    g.step("blob_model", blob_model, "histogram")
    g.step("model_score", model_score, "smoothed", "blob_model", params={"power": power})
    return g


def _blob_build(root: Path, data: Path, power: float):
    st = open_store(root)
    items, sources = synthetic_inputs(data, st)
    engine.worker._OBJECTS.clear()  # as a fresh worker: nothing cached in memory
    with get_executor("sync") as ex:
        return build(_blob_graph(power), items, sources, st, ex, progress=False, batch_size=10)


def _blob_values(root: Path) -> dict[str, set[bytes]]:
    st = open_store(root)
    cat = load_catalog(st, "model_score", write_cache=False)
    from store.packs import PackReader

    out: dict[str, set[bytes]] = {}
    for r in range(len(cat)):
        pack, pos = cat.location(r)
        value = PackReader.open(st, "model_score", pack).read([pos])[0]
        out.setdefault(cat.ids[r], set()).add(value.tobytes())
    return out


def test_corrupt_object_blob(tmp_path):
    n = 20
    data = tmp_path / "data"
    write_synthetic_files(data, n)
    clean = tmp_path / "clean"
    assert _blob_build(clean, data, 2.0).ok
    root = tmp_path / "store"
    assert _blob_build(root, data, 1.0).ok
    [blob] = (root / "objects" / "blob_model").rglob("model.blob")
    rkey = blob.relative_to(root).parts[2]
    flip_bytes(blob, at=3)
    st = open_store(root)
    [p] = verify(st, repair=False)
    assert (p.kind, p.node, p.id) == ("object", "blob_model", rkey)
    assert "checksum mismatch" in p.reason

    # a build that reads the object (model_score's params changed) quarantines it
    rep = _blob_build(root, data, 2.0)
    assert not rep.ok
    # the first task to read it quarantines it; a later one finds it gone
    corrupt = [f for f in rep.failures if f.type == "CorruptInput"]
    gone = [f for f in rep.failures if f.type == "StoreError" and "not in the store" in f.reason]
    assert len(corrupt) == 1 and "quarantined" in corrupt[0].reason, rep.failures
    assert len(corrupt) + len(gone) == len(rep.failures) == 2, rep.failures
    assert rkey in quarantined(root)
    assert load_objects(st, "blob_model").get(bytes.fromhex(rkey)) is None
    # ... and the next one refits it, byte for byte, and scores every item
    rep = _blob_build(root, data, 2.0)
    assert rep.ok, rep.failures
    assert rep.steps["blob_model"].computed == 1 and rep.steps["model_score"].computed == n
    assert verify(st, repair=False) == []
    got, want = _blob_values(root), _blob_values(clean)
    assert all(want[i] <= got[i] for i in want)


# --------------------------------------------------------------------------
# 4. a source file rewritten between planning and reading


def _rewrite_when_read(monkeypatch, victim: Path, new: bytes | None) -> list[str]:
    """Make ``engine.worker._read_source`` rewrite (or delete, ``new=None``) ``victim``
    just before it reads it -- once."""
    original = engine.worker._read_source
    hits: list[str] = []

    def read(path: str, expected: bytes | None) -> bytes:
        if os.path.basename(path) == victim.name and not hits:
            hits.append(path)
            if new is None:
                victim.unlink()
            else:
                victim.write_bytes(new)
        return original(path, expected)

    monkeypatch.setattr(engine.worker, "_read_source", read)
    return hits


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_source_rewritten_while_the_build_runs(monkeypatch, tmp_path, scheduler):
    n = 20
    data = tmp_path / "data"
    files = write_synthetic_files(data, n)
    victim = files[7]
    old, new = victim.read_bytes(), bytes(reversed(victim.read_bytes()))
    root = tmp_path / "store"
    hits = _rewrite_when_read(monkeypatch, victim, new)
    rep = build_here(root, data, {}, scheduler, batch_size=10)
    assert hits
    [f] = rep.failures
    assert (f.step, f.id, f.type, f.bad_input) == ("parsed", victim.name, "SourceChanged", True)
    assert "changed while the build was running" in f.reason
    assert str(data) not in f.reason  # stored with the item: no path (a folder may be PHI)
    # nothing is stored for it: not under the planned (old) key, not under the new one
    assert all(victim.name not in ids for ids in stored_ids(root).values())
    assert rep.steps["histogram"].computed == n - 1
    monkeypatch.undo()

    rep = build_here(root, data, {})
    assert rep.ok, rep.failures
    assert rep.steps["parsed"].computed == 1 and rep.steps["mean_histogram"].computed == 1
    st = open_store(root)
    cat = load_catalog(st, "parsed", write_cache=False)
    [row] = [r for r in range(len(cat)) if cat.ids[r] == victim.name]
    from store.packs import PackReader

    got = PackReader.open(st, "parsed", cat.location(row)[0]).read([cat.location(row)[1]])[0]
    np.testing.assert_array_equal(got, parsed(new))
    assert not np.array_equal(got, parsed(old))
    assert_intact(root)


@pytest.mark.parametrize("how", ["changed back", "moved away and back"])
def test_transient_source_failure_is_not_remembered(monkeypatch, tmp_path, how):
    n = 12
    data = tmp_path / "data"
    files = write_synthetic_files(data, n)
    victim = files[4]
    old = victim.read_bytes()
    root = tmp_path / "store"
    _rewrite_when_read(monkeypatch, victim, None if how.startswith("moved") else b"x" + old)
    rep = build_here(root, data, {})
    assert [f.id for f in rep.failures] == [victim.name]
    monkeypatch.undo()
    victim.write_bytes(old)  # the file is what it was when the build planned
    rep = build_here(root, data, {})
    assert rep.ok, [(f.type, f.reason, f.new) for f in rep.failures]
    assert rep.steps["parsed"].computed == 1


# --------------------------------------------------------------------------
# 5. gc --delete beside running builds


def gc_now(root: Path, data: Path, params: dict, grace: float) -> Any:
    """What ``flow gc --delete`` does, for the synthetic project: keep what a plan of
    ``params`` uses (fresh and failed keys), then collect."""
    st = open_store(root)
    items, _ = synthetic_inputs(data, None)
    g = synthetic_graph(params)
    cats = {n: load_catalog(st, n, write_cache=False) for n in ITEM_NODES}
    objs = {n: load_objects(st, n) for n in SET_NODES}
    p = plan(g, items, cats, objs, reasons=False)
    live_items: dict[str, set] = {}
    live_objects: set = set()
    for name, sp in p.steps.items():
        step = g[name]
        if step.kind == "source":
            continue
        keep = [rk for s, rk in zip(sp.status, sp.rkeys) if s in (FRESH, FAILED) and rk]
        if step.kind == "item":
            live_items.setdefault(step.node_name, set()).update(keep)
        else:
            live_objects.update((step.node_name, bytes(rk).hex()) for rk in keep)
    return collect(st, live_items=live_items, live_objects=live_objects, grace=grace, delete=True)


class GcLoop:
    """``gc_now`` over and over in a thread until stopped; counts what it deleted."""

    def __init__(self, root: Path, data: Path, params: dict, grace: float):
        self.args = (root, data, params, grace)
        self.deleted: dict[str, int] = {}
        self.runs = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                res = gc_now(*self.args)
            except Exception as e:  # reported by the test
                self.errors.append(e)
                continue
            self.runs += 1
            for reason, paths in res.dead.items():
                self.deleted[reason] = self.deleted.get(reason, 0) + len(paths)
            time.sleep(0.02)

    def __enter__(self) -> GcLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def _age(root: Path, seconds: float) -> None:
    t = time.time() - seconds
    for p in root.rglob("*"):
        os.utime(p, (t, t))


def test_gc_after_every_publish_keeps_what_the_build_needs(monkeypatch, reference, tmp_path):
    """gc --delete (default grace) run right after each pack and object a build publishes:
    young files are kept, what the build publishes is never lost, old dead packs go."""
    n = 30
    ref = reference(n)
    root = tmp_path / "store"
    assert build_here(root, ref.data, {"smoothed": {"width": 5}}, batch_size=10).ok
    old_parsed = set(packs_by_ids(root, "parsed"))
    old_dead = {k: set(packs_by_ids(root, k)) for k in ("smoothed", "histogram")}
    _age(root, 7200)
    put = LocalStore.put
    runs: list[int] = []

    def put_then_gc(self: LocalStore, path: str, data: bytes) -> None:
        put(self, path, data)
        if path.endswith(".json") and path.startswith(("packs/", "objects/")):
            res = gc_now(root, ref.data, {}, grace=3600.0)
            runs.append(res.files)

    monkeypatch.setattr(LocalStore, "put", put_then_gc)
    rep = build_here(root, ref.data, {}, batch_size=10)
    monkeypatch.undo()
    assert rep.ok, rep.failures
    assert len(runs) >= 7 and sum(runs) > 0  # every publish, and it did collect
    assert old_parsed <= set(packs_by_ids(root, "parsed"))  # old but live: kept
    for k, dead in old_dead.items():
        assert not dead & set(packs_by_ids(root, k)), k  # old and dead: collected
    again = build_here(root, ref.data, {})
    assert all(s.computed == 0 for s in again.steps.values())
    assert_same_content(assert_intact(root), ref.content)


N_GC = 60  # items of the gc stress tests: builds of a few seconds
STRESS_TIMEOUT = 30.0  # a build beside gc that takes longer is taken as hung


def _wait_or_hang(proc: subprocess.Popen, log: Callable) -> int:
    try:
        return proc.wait(timeout=STRESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a build hangs beside gc (> {STRESS_TIMEOUT:.0f} s):\n{log(proc)}")


@pytest.mark.slow
def test_gc_beside_two_builds_keeps_everything_they_publish(spawn_build, reference, tmp_path):
    ref = reference(N_GC)
    root = tmp_path / "store"
    # an older build with other params: its parsed packs stay live, the rest is dead
    assert build_here(root, ref.data, {"smoothed": {"width": 5}}, batch_size=10).ok
    old_parsed = set(packs_by_ids(root, "parsed"))
    old_dead = {n: set(packs_by_ids(root, n)) for n in ("smoothed", "histogram")}
    _age(root, 7200)
    procs = [
        spawn_build(root, ref.data, {}, "threads", workers=2, batch_size=5, pack_delay=0.1)
        for _ in range(2)
    ]
    with GcLoop(root, ref.data, {}, grace=3600.0) as gc:
        for p in procs:
            assert _wait_or_hang(p, spawn_build.log) == 0, spawn_build.log(p)
    assert not gc.errors, gc.errors
    assert gc.runs >= 3, "gc did not run while the builds did"
    gc_now(root, ref.data, {}, 3600.0)  # once more, after them
    assert old_parsed <= set(packs_by_ids(root, "parsed"))  # old but live: kept
    for n, dead in old_dead.items():  # old and dead: collected
        assert not dead & set(packs_by_ids(root, n)), n
    rep = build_here(root, ref.data, {})
    assert rep.ok and all(s.computed == 0 for s in rep.steps.values()), rep.steps
    assert_same_content(assert_intact(root), ref.content)


@pytest.mark.slow
def test_gc_with_zero_grace_beside_a_build_converges_after_verify(spawn_build, reference, tmp_path):
    """grace=0 is unsafe while a build runs (it deletes a writer's files before their
    manifest is published); the build must still end, and verify + a rebuild repair it."""
    ref = reference(N_GC)
    root = tmp_path / "store"
    proc = spawn_build(root, ref.data, {}, "threads", workers=2, batch_size=5, pack_delay=0.1)
    with GcLoop(root, ref.data, {}, grace=0.0) as gc:
        _wait_or_hang(proc, spawn_build.log)
    assert gc.runs >= 3
    st = open_store(root)
    verify(st, repair=True)
    rep = build_here(root, ref.data, {})
    assert rep.ok, rep.failures
    again = build_here(root, ref.data, {})
    assert all(s.computed == 0 for s in again.steps.values())
    assert_same_content(assert_intact(root), ref.content)


def test_gc_keeps_a_pack_published_during_its_walk(monkeypatch, reference, tmp_path):
    ref = reference(20)
    root = tmp_path / "store"
    held: list[tuple[str, bytes]] = []
    put = LocalStore.put

    def hold_a_manifest(self: LocalStore, path: str, data: bytes) -> None:
        if path.startswith("packs/smoothed/") and path.endswith(".json") and not held:
            held.append((path, data))  # this writer is slow to publish
            return None
        return put(self, path, data)

    monkeypatch.setattr(LocalStore, "put", hold_a_manifest)
    build_here(root, ref.data, {}, batch_size=10)
    monkeypatch.setattr(LocalStore, "put", put)
    [(path, data)] = held
    walk = LocalStore.walk

    def walk_then_publish(self: LocalStore, prefix: str = "") -> Iterator:
        entries = list(walk(self, prefix))
        put(self, path, data)  # the writer publishes right after gc's walk
        return iter(entries)

    monkeypatch.setattr(LocalStore, "walk", walk_then_publish)
    gc_now(root, ref.data, {}, grace=3600.0)
    monkeypatch.undo()
    assert (root / path).exists()
    assert verify(open_store(root), repair=False) == []


def test_gc_with_zero_grace_never_publishes_an_incomplete_pack(monkeypatch, reference, tmp_path):
    ref = reference(20)
    root = tmp_path / "store"
    put = LocalStore.put
    fired: list[str] = []

    def put_after_gc(self: LocalStore, path: str, data: bytes) -> None:
        if path.startswith("packs/smoothed/") and path.endswith(".json") and not fired:
            fired.append(path)
            collect(self, live_items=None, grace=0.0, delete=True)
        return put(self, path, data)

    monkeypatch.setattr(LocalStore, "put", put_after_gc)
    build_here(root, ref.data, {}, batch_size=10)
    monkeypatch.undo()
    assert fired
    assert verify(open_store(root), repair=False) == []


def test_gc_with_default_grace_never_fails_a_write(monkeypatch, tmp_path):
    st = LocalStore(tmp_path / "store")
    st.put("refs/x.json", b"{}")
    tmpfile = LocalStore._tmpfile

    def tmpfile_then_gc(self: LocalStore) -> Path:
        path = tmpfile(self)  # made tmp/, about to open a file in it
        collect(self, live_items=None, delete=True)  # the default grace
        return path

    monkeypatch.setattr(LocalStore, "_tmpfile", tmpfile_then_gc)
    st.put("packs/n/p.json", b"{}")
    assert st.get("packs/n/p.json") == b"{}"
