"""A conformance suite every :class:`store.abc.Store` backend must pass.

Like zarr-python's ``zarr.testing.store``, it ships with the package so a new
backend is tested by subclassing (the S3 one, on moto, is a few lines)::

    from store.testing import StoreTests, store_model_test

    class TestMyStore(StoreTests):
        def make_store(self, tmp_path):
            return MyStore(f"my://bucket/{tmp_path.name}")

    TestMyStoreModel = store_model_test(lambda: MyStore(f"my://bucket/{uuid4().hex}"))

:class:`StoreTests` checks the interface (round trips, listings, invalid
paths), the concurrency contract of :mod:`store.abc` (a replaced document is
never seen half-written; one of many racing ``put_if_absent`` calls wins),
zarr arrays, refs, packs and objects (round trips, failures, orphans,
corruption caught by checksums) and the catalog cache (reconciled with the
listing, rebuilt when unreadable).  :func:`store_model_test` is a Hypothesis
state machine that runs random sequences of puts, conditional puts, deletes,
reads and listings against a dict model.

Tests take a ``store`` fixture built by ``make_store(tmp_path)``; everything
the suite writes is removed afterwards with ``delete_tree("")``.
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flow.errors import CorruptObject, StoreError
from flow.keys import key
from flow.values import Blob
from store.abc import Store
from store.catalog import Catalog, load_catalog
from store.objects import read_object, read_object_manifest, write_object
from store.outputs import ItemResult, Recipe, canonical_output
from store.packs import PackReader, write_pack
from store.refs import list_refs, move_ref, read_ref, ref_history

__all__ = ["StoreTests", "run_threads", "store_model_test"]

INVALID_PATHS = ("..", "../escape", "a/../../escape", "/abs/escape", "a//b", "a/./b", "a/", "a\\b")


def _current(store: Store, name: str) -> dict:
    """The current entry of ref ``name`` (which must exist)."""
    entry = read_ref(store, name)
    assert entry is not None, f"no ref {name!r}"
    return entry


def run_threads(n: int, target: Callable[[int], Any]) -> list[Any]:
    """Run ``target(i)`` in ``n`` threads released together; their results, in order.

    An exception in any thread is re-raised here.
    """
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = target(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _recipe(node: str = "nd", **params: Any) -> Recipe:
    return Recipe(
        node=node, step=node, version=1, fingerprint="f" * 32, params=params, prefix="00" * 16
    )


def _rkey(item_id: str) -> bytes:
    return bytes(key(("rkey", item_id)))


def _ok(item_id: str, value: Any) -> ItemResult:
    value = canonical_output(value)
    inputs = (bytes(key(item_id)),)
    return ItemResult(item_id, _rkey(item_id), inputs, value, bytes(key(value)))


def _failed(item_id: str) -> ItemResult:
    error = {"type": "ItemError", "reason": f"{item_id} is broken", "traceback": ""}
    return ItemResult(item_id, _rkey(item_id), (bytes(key(item_id)),), error=error)


def _flip_byte(store: Store, path: str) -> None:
    """Corrupt one byte of a stored file, on disk where the backend has one."""
    local = store.local_path(path)
    if local is not None:
        with open(local, "r+b") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(size // 2)
            b = fh.read(1)
            fh.seek(size // 2)
            fh.write(bytes([b[0] ^ 0xFF]))
        return
    data = bytearray(store.get(path))
    data[len(data) // 2] ^= 0xFF
    store.put(path, bytes(data))


def _outside_root(store: Store) -> set[str]:
    """Files beside the store's root (to check that nothing escapes it)."""
    fs = getattr(store, "fs", None)
    root = str(getattr(store, "root", ""))
    if fs is not None:
        parent = posixpath.dirname(root.rstrip("/"))
        if not parent:
            return set()
        return {p for p in fs.find(parent) if not p.lstrip("/").startswith(root.lstrip("/") + "/")}
    if root:
        base = Path(root).parent
        return {str(p) for p in base.rglob("*") if Path(root) not in (p, *p.parents)}
    return set()


class StoreTests:
    """Tests every backend must pass; subclasses define :meth:`make_store`."""

    def make_store(self, tmp_path: Path) -> Store:
        raise NotImplementedError

    @pytest.fixture
    def store(self, tmp_path: Path):
        s = self.make_store(tmp_path)
        try:
            yield s
        finally:
            s.delete_tree("")
            s.close()

    # -- documents ------------------------------------------------------------

    def test_put_get_round_trip(self, store: Store) -> None:
        docs = {"a": b"", "b/c": bytes(range(256)), "b/d/e.json": b'{"x": 1}' * 1000}
        for path, data in docs.items():
            assert store.put(path, data) is None
        for path, data in docs.items():
            got = store.get(path)
            assert type(got) is bytes and got == data

    def test_get_missing_raises_file_not_found(self, store: Store) -> None:
        with pytest.raises(FileNotFoundError):
            store.get("missing")
        store.put("present/x", b"1")
        with pytest.raises(FileNotFoundError):
            store.get("present/y")
        with pytest.raises(FileNotFoundError):
            store.get("absent/folder/y")

    def test_put_replaces(self, store: Store) -> None:
        store.put("doc", b"first version, longer")
        store.put("doc", b"second")
        assert store.get("doc") == b"second"
        assert [(e.path, e.size) for e in store.walk("")] == [("doc", 6)]

    def test_put_is_atomic_for_concurrent_readers(self, store: Store) -> None:
        size, n = 1 << 20, 24
        versions = [bytes([i]) * (size + i) for i in range(n)]
        store.put("doc", versions[0])
        done = threading.Event()
        seen: list[int] = []
        bad: list[str] = []

        def reader() -> None:
            while not done.is_set() or not seen:
                try:
                    data = store.get("doc")
                except FileNotFoundError:  # "or nothing" is allowed by the contract
                    continue
                i = len(data) - size
                if not (0 <= i < n and data == versions[i]):
                    bad.append(f"read {len(data)} bytes, starting {data[:4]!r}")
                    return
                seen.append(i)

        t = threading.Thread(target=reader)
        t.start()
        try:
            for v in versions[1:]:
                store.put("doc", v)
        finally:
            done.set()
            t.join()
        assert not bad, bad
        assert seen and store.get("doc") == versions[-1]

    def test_put_new(self, store: Store) -> None:
        files = {
            "packs/n/p/a/zarr.json": b"{}",
            "packs/n/p/a/c/0/1": b"\x00\x01",
            "packs/n/p/z": b"",
        }
        store.put_new(files)
        assert {p: store.get(p) for p in files} == files
        assert store.list("packs/n/p") == ["a", "z"]
        assert sorted(e.path for e in store.walk("packs")) == sorted(files)

    def test_put_if_absent(self, store: Store) -> None:
        assert store.put_if_absent("x/once", b"first") is True
        assert store.put_if_absent("x/once", b"second") is False
        assert store.get("x/once") == b"first"
        store.delete(["x/once"])
        assert store.put_if_absent("x/once", b"third") is True
        assert store.get("x/once") == b"third"

    def test_put_if_absent_race_has_one_winner(self, store: Store) -> None:
        if not store.supports_conditional:
            pytest.skip(f"{type(store).__name__} does not promise an atomic put_if_absent")
        for trial in range(5):
            path = f"race/{trial}"

            def put(i: int, p: str = path) -> bool:
                return store.put_if_absent(p, f"writer {i}".encode())

            won = run_threads(8, put)
            assert sum(won) == 1, won
            assert store.get(path) == f"writer {won.index(True)}".encode()

    def test_exists(self, store: Store) -> None:
        store.put("f/g/h", b"1")
        assert store.exists("f/g/h")
        assert not store.exists("f/g")  # a folder is not a file
        assert not store.exists("f/g/i")
        assert not store.exists("nothing/here")

    def test_list(self, store: Store) -> None:
        for p in ("l/b", "l/a", "l/sub/x", "l/sub/y/z", "lx/other"):
            store.put(p, b"1")
        assert store.list("l") == ["a", "b", "sub"]
        assert store.list("l/sub") == ["x", "y"]
        assert store.list("missing") == []
        assert "l" in store.list("") and "lx" in store.list("")

    def test_walk(self, store: Store) -> None:
        files = {"w/a": b"1", "w/b/c": b"22", "w/b/d/e": b"333", "w/bc": b"4444", "x": b"5"}
        for p, d in files.items():
            store.put(p, d)
        entries = list(store.walk("w"))
        assert sorted((e.path, e.size) for e in entries) == sorted(
            (p, len(d)) for p, d in files.items() if p.startswith("w/")
        )
        assert all(isinstance(e.mtime, float) and e.mtime > 0 for e in entries)
        assert sorted(e.path for e in store.walk("w/b")) == ["w/b/c", "w/b/d/e"]  # not w/bc
        assert sorted(e.path for e in store.walk("")) == sorted(files)
        assert list(store.walk("missing")) == []

    def test_delete(self, store: Store) -> None:
        for p in ("d/a", "d/b", "d/c"):
            store.put(p, b"1")
        store.delete(["d/a", "d/c", "d/never-existed"])
        store.delete([])
        assert [e.path for e in store.walk("d")] == ["d/b"]

    def test_delete_tree(self, store: Store) -> None:
        for p in ("t/a/x", "t/a/y/z", "t/ab", "t/a.json"):
            store.put(p, b"1")
        store.delete_tree("t/a")
        store.delete_tree("t/missing")
        assert sorted(e.path for e in store.walk("t")) == ["t/a.json", "t/ab"]
        assert not store.exists("t/a/x")

    def test_invalid_paths_are_rejected(self, store: Store) -> None:
        before = _outside_root(store)
        calls: list[Callable[[str], Any]] = [
            store.get,
            lambda p: store.put(p, b"escaped"),
            lambda p: store.put_if_absent(p, b"escaped"),
            store.exists,
            store.list,
            lambda p: list(store.walk(p)),
            lambda p: store.delete([p]),
            store.delete_tree,
            store.zarr,
        ]
        for path in INVALID_PATHS:
            for call in calls:
                with pytest.raises(ValueError, match="invalid store path"):
                    call(path)
        assert list(store.walk("")) == []
        assert _outside_root(store) == before

    # -- zarr -------------------------------------------------------------------

    def test_zarr_round_trip(self, store: Store) -> None:
        import zarr

        data = np.arange(30, dtype="<f4").reshape(10, 3)
        arr = zarr.create_array(
            store.zarr("arrays/x"),
            name="v",
            shape=data.shape,
            chunks=(4, 3),
            dtype=data.dtype,
            zarr_format=3,
        )
        arr[...] = data
        ro = zarr.open_array(store.zarr("arrays/x", read_only=True), path="v", mode="r")
        np.testing.assert_array_equal(ro[...], data)
        np.testing.assert_array_equal(ro[3:7], data[3:7])
        paths = {e.path for e in store.walk("arrays")}
        assert "arrays/x/v/zarr.json" in paths and len(paths) >= 4  # metadata + 3 chunks

    # -- refs -------------------------------------------------------------------

    def test_refs_history(self, store: Store) -> None:
        assert read_ref(store, "team/best") is None and ref_history(store, "team/best") == []
        for i in range(4):
            entry = move_ref(store, "team/best", {"index": i}, message=f"move {i}")
            assert entry["seq"] == i + 1
        move_ref(store, "other", {"index": 9})
        assert _current(store, "team/best")["value"] == {"index": 3}
        hist = ref_history(store, "team/best")
        assert [e["value"]["index"] for e in hist] == [0, 1, 2, 3]
        assert [e["seq"] for e in hist] == [1, 2, 3, 4]
        assert [e["previous"] for e in hist] == [None, 1, 2, 3]
        assert hist[2]["message"] == "move 2"
        assert list_refs(store) == ["other", "team/best"]
        assert list_refs(store, "team/") == ["team/best"]
        for bad in ("", "../x", "a//b", "/abs", "a b", ".hidden"):
            with pytest.raises(ValueError, match="invalid ref name"):
                move_ref(store, bad, {})

    def test_concurrent_ref_moves_are_all_recorded(self, store: Store) -> None:
        if not store.supports_conditional:  # refs order their entries with put_if_absent
            pytest.skip(f"{type(store).__name__} does not promise an atomic put_if_absent")
        n, moves = 6, 4

        def mover(i: int) -> list[int]:
            return [move_ref(store, "shared", {"t": i, "m": m})["seq"] for m in range(moves)]

        seqs = [s for got in run_threads(n, mover) for s in got]
        hist = ref_history(store, "shared")
        assert sorted(seqs) == list(range(1, n * moves + 1))
        assert [e["seq"] for e in hist] == list(range(1, n * moves + 1))
        assert sorted((e["value"]["t"], e["value"]["m"]) for e in hist) == [
            (t, m) for t in range(n) for m in range(moves)
        ]
        assert _current(store, "shared")["seq"] == n * moves

    def test_move_ref_refuses_missing_objects(self, store: Store) -> None:
        rk = bytes(key("index"))
        move_ref(store, "prod", {"v": 1})
        with pytest.raises(StoreError, match="not complete"):
            move_ref(store, "prod", {"v": 2}, objects=[("index", rk.hex())])
        assert _current(store, "prod")["value"] == {"v": 1}
        value = canonical_output(np.zeros(3))
        write_object(
            store, _recipe("index"), rk, [], ItemResult("", rk, (), value, bytes(key(value)))
        )
        entry = move_ref(store, "prod", {"v": 2}, objects=[("index", rk.hex())])
        assert entry["objects"] == [["index", rk.hex()]] and entry["seq"] == 2

    # -- packs and objects --------------------------------------------------------

    def test_pack_round_trip(self, store: Store) -> None:
        values = [
            {
                "vec": np.arange(i + 1, dtype="<f4"),
                "img": np.full((2, 3), i, np.uint8),
                "label": f"l{i}",
                "shape": (i, ("x", 1.5)),
                "none": None,
                "ok": i % 2 == 0,
            }
            for i in range(4)
        ]
        results = [_ok(f"item{i}", v) for i, v in enumerate(values)]
        manifest = write_pack(store, _recipe(scale=(1, 2)), results)
        assert manifest["fields"]["vec"]["layout"] == "ragged"
        assert manifest["fields"]["img"]["layout"] == "stacked"
        reader = PackReader.open(store, "nd", manifest["id"])
        assert reader.manifest["params"] == {"scale": [1, 2]} and reader.manifest["n"] == 4
        positions = [3, 0, 2, 2]
        for pos, got in zip(positions, reader.read(positions)):
            want = results[pos].value
            assert set(got) == set(want)
            for name in ("vec", "img"):
                np.testing.assert_array_equal(got[name], want[name])
                assert got[name].dtype == want[name].dtype
            assert {k: got[k] for k in ("label", "shape", "none", "ok")} == {
                k: want[k] for k in ("label", "shape", "none", "ok")
            }
            assert key(got) == key(want) == reader.ckey(pos)
            assert reader.rkey(pos) == results[pos].rkey
        assert [key(v) for v in reader.read(range(4))] == [r.ckey for r in results]

    def test_small_arrays_written_through_memory_match_zarr(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Arrays encoded in memory and put as files (small ones) are the very
        files zarr writes into the store itself (big ones), sharded ones too."""
        import store.packs as packs

        values = [
            {"big": np.arange(200_000, dtype="<f4") * i, "small": np.full((4, 5), i, np.uint8)}
            for i in range(3)
        ]  # "big" spans 3 shards of 1 MiB chunks
        results = [_ok(f"i{i}", v) for i, v in enumerate(values)]

        def written(manifest: dict) -> dict[str, bytes]:
            base = f"packs/nd/{manifest['id']}/"
            return {e.path[len(base) :]: store.get(e.path) for e in store.walk(base[:-1])}

        in_memory = write_pack(store, _recipe(), results)
        monkeypatch.setattr(packs, "_IN_MEMORY_BYTES", 0)
        direct = write_pack(store, _recipe(), results)
        assert written(in_memory) == written(direct)
        assert any(p.startswith("big/c/") for p in written(in_memory))
        for m in (in_memory, direct):
            got = PackReader.open(store, "nd", m["id"]).read([2, 0])
            assert [key(g) for g in got] == [results[2].ckey, results[0].ckey]

    def test_pack_of_bare_arrays(self, store: Store) -> None:
        results = [_ok(f"i{i}", np.full((5,), i, "<i8")) for i in range(3)]
        reader = PackReader.open(store, "nd", write_pack(store, _recipe(), results)["id"])
        got = reader.read([1, 2, 0])
        assert all(isinstance(g, np.ndarray) for g in got)
        assert [int(g[0]) for g in got] == [1, 2, 0]

    def test_pack_failures(self, store: Store) -> None:
        results = [_ok("good0", np.ones(2)), _failed("bad"), _ok("good1", np.zeros(2))]
        manifest = write_pack(store, _recipe(), results)
        assert manifest["n"] == 2 and manifest["ids"] == ["good0", "good1"]
        [failure] = manifest["failures"]
        assert failure["id"] == "bad" and failure["reason"] == "bad is broken"
        assert failure["rkey"] == results[1].rkey.hex()
        reader = PackReader.open(store, "nd", manifest["id"])
        np.testing.assert_array_equal(reader.read([1])[0], np.zeros(2))
        cat = load_catalog(store, "nd")
        assert len(cat) == 2 and set(cat.failed) == {results[1].rkey}
        assert cat.failed_for("nd", "bad") == {results[1].rkey}
        assert cat.index.keys() == {results[0].rkey, results[2].rkey}
        everything_failed = write_pack(store, _recipe(), [_failed("bad2")])
        assert everything_failed["n"] == 0 and len(load_catalog(store, "nd")) == 2

    def test_orphan_pack_is_invisible(self, store: Store) -> None:
        kept = write_pack(store, _recipe(), [_ok("a", np.ones(3))])
        orphan = write_pack(store, _recipe(), [_ok("b", np.ones(3)), _ok("c", np.ones(3))])
        store.delete([f"packs/nd/{orphan['id']}.json"])  # a writer killed before publishing
        assert any(e.path.startswith(f"packs/nd/{orphan['id']}/") for e in store.walk("packs"))
        cat = load_catalog(store, "nd")
        assert cat.ids == ["a"] and [p.id for p in cat.packs] == [kept["id"]]
        with pytest.raises(StoreError, match="gone"):
            PackReader.open(store, "nd", orphan["id"])

    def test_object_round_trip(self, store: Store) -> None:
        cases = {
            "dict": {
                "emb": np.arange(12, dtype="<f4").reshape(3, 4),
                "index": Blob(b"\x00idx" * 99),
                "n": 3,
                "names": ("a", "b"),
                "ratio": 0.5,
            },
            "array": np.eye(3, dtype=">f8"),
            "blob": Blob(b"just bytes"),
            "empty-blob": Blob(b""),
        }
        for name, raw in cases.items():
            value = canonical_output(raw, node="obj")
            rk = bytes(key(("obj", name)))
            result = ItemResult("", rk, (), value, bytes(key(value)), seconds=0.25)
            manifest = write_object(store, _recipe("obj"), rk, [bytes(key(1))], result)
            assert read_object_manifest(store, "obj", rk) == json.loads(json.dumps(manifest))
            got = read_object(store, "obj", rk)
            assert key(got) == key(value) == bytes.fromhex(manifest["ckey"]), name
            assert type(got) is type(value)
        got = read_object(store, "obj", bytes(key(("obj", "dict"))))
        assert got["index"] == Blob(b"\x00idx" * 99) and got["names"] == ("a", "b")

    def test_failed_and_missing_objects(self, store: Store) -> None:
        rk = bytes(key("failing"))
        result = ItemResult(
            "", rk, (), error={"type": "ValueError", "reason": "no", "traceback": ""}
        )
        write_object(store, _recipe("obj"), rk, [], result)
        manifest = read_object_manifest(store, "obj", rk)
        assert manifest is not None and manifest["failure"]["reason"] == "no"
        with pytest.raises(StoreError, match="recorded failure"):
            read_object(store, "obj", rk)
        with pytest.raises(StoreError, match="not in the store"):
            read_object(store, "obj", bytes(key("never written")))
        assert read_object_manifest(store, "obj", bytes(key("never written"))) is None

    # -- corruption ---------------------------------------------------------------

    def test_corrupt_pack_chunk_is_detected(self, store: Store) -> None:
        manifest = write_pack(store, _recipe(), [_ok(f"i{i}", np.arange(64) + i) for i in range(4)])
        base = f"packs/nd/{manifest['id']}"
        [chunk] = [e.path for e in store.walk(base) if "/c/" in e.path]
        _flip_byte(store, chunk)
        with pytest.raises(CorruptObject, match="cannot read"):
            PackReader.open(store, "nd", manifest["id"]).read([0])

    def test_corrupt_blob_is_detected(self, store: Store) -> None:
        rk = bytes(key("blobby"))
        value = canonical_output({"data": Blob(bytes(range(256)) * 4), "arr": np.ones(4)})
        manifest = write_object(
            store, _recipe("obj"), rk, [], ItemResult("", rk, (), value, bytes(key(value)))
        )
        base = f"objects/obj/{rk.hex()}/{manifest['payload']}"
        _flip_byte(store, f"{base}/data.blob")
        with pytest.raises(CorruptObject, match="checksum"):
            read_object(store, "obj", rk)
        store.put(f"{base}/data.blob", bytes(range(256)) * 4)
        assert key(read_object(store, "obj", rk)) == key(value)
        [chunk] = [e.path for e in store.walk(f"{base}/arr") if "/c/" in e.path]
        _flip_byte(store, chunk)
        with pytest.raises(CorruptObject, match="array arr"):
            read_object(store, "obj", rk)

    # -- catalog ------------------------------------------------------------------

    def test_catalog_reconciles_with_listing(self, store: Store) -> None:
        a = write_pack(store, _recipe(), [_ok(f"a{i}", np.full(2, i)) for i in range(3)])
        cat = load_catalog(store, "nd")
        assert sorted(cat.ids) == ["a0", "a1", "a2"]
        assert store.exists("cache/catalog/nd.npz")
        b = write_pack(store, _recipe(), [_ok("b0", np.zeros(2)), _failed("b-bad")])
        cat = load_catalog(store, "nd")
        assert sorted(cat.ids) == ["a0", "a1", "a2", "b0"] and len(cat.failed) == 1
        row = cat.index[_rkey("b0")]
        assert cat.location(row) == (b["id"], 0) and cat.ckey(row) == bytes(key(np.zeros(2)))
        store.delete([f"packs/nd/{a['id']}.json"])
        store.delete_tree(f"packs/nd/{a['id']}")
        cat = load_catalog(store, "nd")
        assert cat.ids == ["b0"] and [p.id for p in cat.packs] == [b["id"]]
        assert cat.location(cat.index[_rkey("b0")]) == (b["id"], 0)
        cached = Catalog.from_bytes("nd", store.get("cache/catalog/nd.npz"))
        assert cached.ids == ["b0"] and len(cached.failed) == 1

    def test_catalog_survives_a_corrupt_cache(self, store: Store) -> None:
        write_pack(store, _recipe(), [_ok(f"a{i}", np.full(2, i)) for i in range(3)])
        load_catalog(store, "nd")
        store.put("cache/catalog/nd.npz", b"this is not an npz file")
        cat = load_catalog(store, "nd")
        assert sorted(cat.ids) == ["a0", "a1", "a2"]
        assert Catalog.from_bytes("nd", store.get("cache/catalog/nd.npz")).ids == cat.ids
        store.delete(["cache/catalog/nd.npz"])
        assert len(load_catalog(store, "nd", write_cache=False)) == 3
        assert not store.exists("cache/catalog/nd.npz")


# --------------------------------------------------------------------------
# a stateful model test


_FILES = ("m/a", "m/b", "m/sub/c", "m/sub/d", "m/sub/deep/e")
_FOLDERS = ("m/sub", "m/sub/deep")


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0]


def _name(path: str) -> str:
    return path.rsplit("/", 1)[1]


def store_model_test(
    make_store: Callable[[], Store], *, max_examples: int = 20, steps: int = 15
) -> type:
    """A ``unittest.TestCase`` running random operations on fresh stores
    from ``make_store()`` against a dict model (assign it to a ``Test*`` name)."""
    from hypothesis import settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

    paths = st.sampled_from(_FILES)
    data = st.binary(max_size=48)

    class StoreModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.store = make_store()
            self.model: dict[str, bytes] = {}

        def teardown(self) -> None:
            self.store.delete_tree("")
            self.store.close()

        @rule(path=paths, data=data)
        def put(self, path: str, data: bytes) -> None:
            self.store.put(path, data)
            self.model[path] = data

        @rule(path=paths, data=data)
        def put_if_absent(self, path: str, data: bytes) -> None:
            assert self.store.put_if_absent(path, data) is (path not in self.model)
            self.model.setdefault(path, data)

        @rule(doomed=st.lists(paths, max_size=3))
        def delete(self, doomed: list[str]) -> None:
            self.store.delete(doomed)
            for p in doomed:
                self.model.pop(p, None)

        @precondition(lambda self: bool(self.model))
        @rule(folder=st.sampled_from(_FOLDERS))
        def delete_tree(self, folder: str) -> None:
            self.store.delete_tree(folder)
            for p in [p for p in self.model if p.startswith(folder + "/")]:
                del self.model[p]

        @rule(path=paths)
        def get(self, path: str) -> None:
            if path in self.model:
                assert self.store.get(path) == self.model[path]
            else:
                try:
                    self.store.get(path)
                except FileNotFoundError:
                    pass
                else:
                    raise AssertionError(f"get({path!r}) found a deleted file")

        @invariant()
        def listings_match(self) -> None:
            walked = {e.path: e.size for e in self.store.walk("m")}
            assert walked == {p: len(d) for p, d in self.model.items()}
            for path in _FILES:
                assert self.store.exists(path) is (path in self.model)
            for folder in ("m", *_FOLDERS):
                names = set(self.store.list(folder))
                direct = {_name(p) for p in self.model if _parent(p) == folder}
                subfolders = {_name(f) for f in _FOLDERS if _parent(f) == folder}
                # emptied folders may linger on file systems: allowed, files may not
                assert direct <= names <= direct | subfolders, (folder, names, direct)

    StoreModel.TestCase.settings = settings(
        max_examples=max_examples, stateful_step_count=steps, deadline=None, database=None
    )
    return StoreModel.TestCase
