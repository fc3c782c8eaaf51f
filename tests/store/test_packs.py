"""Packs, objects and catalogs beyond the backend suite (on the memory backend).

:class:`store.testing.StoreTests` covers round trips and corruption for every
backend; here: canonical outputs, layouts (sharded, ragged with empty items,
string arrays), what is read back keys the same, manifest errors, catalog
lookups, object catalogs, and known gaps pinned as strict xfails.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from flow.errors import CorruptObject, StoreError
from flow.keys import key
from flow.snapshot import Previous
from flow.values import Blob
from store import open_store
from store.catalog import load_catalog
from store.objects import load_objects, read_object, read_object_manifests, write_object
from store.outputs import ItemResult, Recipe, canonical_output
from store.packs import PackReader, loads, write_pack


@pytest.fixture
def store():
    s = open_store(f"memory://flow-packs-{uuid.uuid4().hex}")
    yield s
    s.delete_tree("")


def recipe(node="nd", *, step=None, version=1, fingerprint="f" * 32, **params) -> Recipe:
    return Recipe(node, step or node, version, fingerprint, params, "00" * 16)


def ok(item_id: str, value, tag: str = "") -> ItemResult:
    value = canonical_output(value)
    return ItemResult(
        item_id, bytes(key(("r", item_id, tag))), (bytes(key(item_id)),), value, bytes(key(value))
    )


def failed(item_id: str, tag: str = "") -> ItemResult:
    return ItemResult(
        item_id,
        bytes(key(("r", item_id, tag))),
        (bytes(key(item_id)),),
        error={"type": "ItemError", "reason": "broken", "traceback": ""},
    )


# --------------------------------------------------------------------------
# canonical outputs


def test_canonical_output_normalizes():
    assert canonical_output(np.float32(1.5)).shape == ()  # 0-d stays 0-d
    f = np.asfortranarray(np.arange(6).reshape(2, 3))
    assert canonical_output(f).flags.c_contiguous
    out = canonical_output({"a": np.int64(3), "t": [1, ["x", 2.5]], "b": Blob(b"z")})
    assert isinstance(out["a"], np.ndarray) and out["t"] == (1, ("x", 2.5))
    assert key(canonical_output(f)) == key(f)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1, 2], "returned list"),
        (np.array([object()]), "dtype object"),
        ({"_hidden": np.ones(1)}, "field names"),
        ({"a/b": np.ones(1)}, "field names"),
        ({"": np.ones(1)}, "field names"),
        ({"x": {"nested": 1}}, "not dict"),
        ({"x": float("nan")}, "non-finite"),
        ({"x": object()}, "not object"),
    ],
)
def test_canonical_output_rejects(value, message):
    with pytest.raises(TypeError, match=message):
        canonical_output(value, node="mynode")


def test_item_nodes_cannot_return_blobs(store):
    with pytest.raises(TypeError, match="item nodes cannot return Blobs"):
        canonical_output(Blob(b"x"), node="n", allow_blobs=False)
    with pytest.raises(TypeError, match="cannot return Blobs"):
        write_pack(store, recipe(), [ok("a", {"b": Blob(b"x"), "a": np.ones(1)})])


def test_write_pack_rejects_inconsistent_items(store):
    with pytest.raises(TypeError, match="different array fields"):
        write_pack(store, recipe(), [ok("a", {"x": np.ones(1)}), ok("b", {"y": np.ones(1)})])
    with pytest.raises(TypeError, match="mixed dtypes"):
        write_pack(store, recipe(), [ok("a", np.ones(2, "<f4")), ok("b", np.ones(2, "<f8"))])
    assert store.list("packs/nd") == [] or not any(
        n.endswith(".json") for n in store.list("packs/nd")
    )


# --------------------------------------------------------------------------
# layouts: what is read back keys the same


@pytest.mark.parametrize(
    "make",
    [
        lambda i: np.full((3, 2), i, ">i4"),  # big-endian is stored little-endian
        lambda i: np.arange(i, dtype="<f8"),  # ragged, first item empty
        lambda i: np.array([i % 2 == 0, True]),
        lambda i: np.float32(i),  # a numpy scalar
        lambda i: {"e": np.zeros((0, 4), np.uint8), "n": i, "s": None},
    ],
    ids=["big-endian", "ragged", "bool", "scalar", "empty-field"],
)
def test_read_back_keys_the_same(store, make):
    results = [ok(f"i{i}", make(i)) for i in range(4)]
    manifest = write_pack(store, recipe(), results)
    reader = PackReader.open(store, "nd", manifest["id"])
    for positions in ([0, 1, 2, 3], [3, 1], [2, 2, 0]):
        got = reader.read(positions)
        assert [key(g) for g in got] == [results[p].ckey for p in positions]
        assert [reader.ckey(p) for p in positions] == [results[p].ckey for p in positions]


def test_sharded_pack_random_access(store):
    # 256 KiB per item: 4 items per inner chunk, so 10 items need shards
    results = [ok(f"i{i:02d}", np.full(1 << 16, i, "<f4")) for i in range(10)]
    manifest = write_pack(store, recipe(), results)
    zmeta = store.get(f"packs/nd/{manifest['id']}/_/zarr.json")
    assert b"sharding" in zmeta
    reader = PackReader.open(store, "nd", manifest["id"])
    got = reader.read([9, 0, 5, 4, 9])
    assert [int(g[0]) for g in got] == [9, 0, 5, 4, 9]
    assert all(g.shape == (1 << 16,) for g in got)
    assert [key(g) for g in reader.read(range(10))] == [r.ckey for r in results]


# --------------------------------------------------------------------------
# manifests


def test_corrupt_or_foreign_manifests(store):
    with pytest.raises(CorruptObject, match="not valid JSON"):
        loads(b"{not json", "where")
    with pytest.raises(CorruptObject, match="not a flow manifest"):
        loads(b'{"format": "other/9"}', "where")
    good = write_pack(store, recipe(), [ok("a", np.ones(2))])
    bad = write_pack(store, recipe(), [ok("b", np.ones(2))])
    store.put(f"packs/nd/{bad['id']}.json", b'{"trunc')
    with pytest.raises(CorruptObject):
        PackReader.open(store, "nd", bad["id"])
    cat = load_catalog(store, "nd")  # a corrupt manifest's items count as missing
    assert cat.ids == ["a"] and [p.id for p in cat.packs] == [good["id"]]


# --------------------------------------------------------------------------
# catalogs


def test_catalog_lookups(store):
    old = recipe(version=1, scale=1.0)
    new = recipe(version=2, scale=2.0)
    first = write_pack(store, old, [ok("x", np.ones(2), "v1"), ok("y", np.ones(2), "v1")])
    second = write_pack(store, new, [ok("x", np.zeros(2), "v2"), failed("z", "v2")])
    write_pack(store, recipe(step="other"), [ok("x", np.ones(3), "other")])
    cat = load_catalog(store, "nd")
    assert len(cat) == 4
    prev = cat.previous("nd", "x")
    assert prev == Previous("2", "f" * 32, '{"scale":2.0}', bytes(key("x")).hex())
    assert cat.previous("nd", "y").version == "1"
    assert cat.previous("nd", "nothing") is None
    assert cat.previous("other", "x") is not None and cat.previous("other", "y") is None
    rows = cat.rows_for("nd", "x")
    assert [cat.location(r)[0] for r in rows] == [first["id"], second["id"]]
    assert cat.failed_for("nd", "z") == {bytes(key(("r", "z", "v2")))}
    assert cat.failed_for("nd", "x") == set()


def test_catalog_first_copy_wins(store):
    a = write_pack(store, recipe(), [ok("x", np.ones(2))])
    write_pack(store, recipe(), [ok("x", np.ones(2))])  # a second build computed it too
    cat = load_catalog(store, "nd")
    assert len(cat) == 2 and len(cat.index) == 1
    assert cat.location(cat.index[bytes(key(("r", "x", "")))]) == (a["id"], 0)


def test_object_catalog(store):
    rk1, rk2, rk3 = (bytes(key(("fit", i))) for i in range(3))
    value = canonical_output(np.arange(3))
    done = ItemResult("", rk1, (), value, bytes(key(value)))
    write_object(store, recipe("fit", version=1), rk1, [b"a" * 16], done)
    failure = ItemResult("", rk2, (), error={"type": "E", "reason": "r", "traceback": ""})
    write_object(store, recipe("fit", version=2, k=3), rk2, [b"b" * 16], failure)
    objects = load_objects(store, "fit")
    assert objects.get(rk1).ckey == bytes(key(value)) and not objects.get(rk1).failed
    assert objects.get(rk2).failed and objects.get(rk2).ckey is None
    assert objects.get(rk3) is None
    assert [d["version"] for d in read_object_manifests(store, "fit")] == [1, 2]
    assert objects.previous("fit") == Previous("2", "f" * 32, '{"k":3}', (b"b" * 16).hex())
    assert objects.previous("elsewhere") is None
    assert objects.get(rk2).failure["reason"] == "r"
    # loaded again: from the cache, the same states; an object collected since is gone
    again = load_objects(store, "fit")
    assert again.states == objects.states
    store.delete([f"objects/fit/{rk1.hex()}.json"])
    assert load_objects(store, "fit").get(rk1) is None
    assert load_objects(store, "fit").get(rk2) == objects.get(rk2)


# --------------------------------------------------------------------------
# known gaps


def test_missing_pack_chunk_is_detected(store):
    manifest = write_pack(store, recipe(), [ok(f"i{i}", np.full(4, i + 1)) for i in range(3)])
    chunks = [e.path for e in store.walk(f"packs/nd/{manifest['id']}") if "/c/" in e.path]
    store.delete(chunks)
    with pytest.raises(CorruptObject):
        PackReader.open(store, "nd", manifest["id"]).read([0, 1])


def test_a_chunk_lost_while_publishing_retracts_the_pack(store, monkeypatch):
    """A chunk deleted between its write and the manifest (gc with no grace) takes
    the manifest back: the write fails and nothing half-written is readable."""
    exists = store.exists
    monkeypatch.setattr(store, "exists", lambda p: "/c/" not in p and exists(p))
    with pytest.raises(StoreError, match="vanished while publishing"):
        write_pack(store, recipe(), [ok("i0", np.ones(3))])
    monkeypatch.undo()
    assert load_catalog(store, "nd").ids == []
    assert not [
        e for e in store.walk("packs") if e.path.endswith(".json") and e.path.count("/") == 2
    ]


def test_missing_object_chunk_is_detected(store):
    rk = bytes(key("obj"))
    value = canonical_output({"a": np.arange(1, 5)})
    m = write_object(store, recipe("obj"), rk, [], ItemResult("", rk, (), value, bytes(key(value))))
    base = f"objects/obj/{rk.hex()}/{m['payload']}/a"
    store.delete([e.path for e in store.walk(base) if "/c/" in e.path])
    with pytest.raises((CorruptObject, StoreError)):
        read_object(store, "obj", rk)


def test_string_arrays_are_refused_with_a_clear_error():
    # zarr's fixed-length string types have no v3 specification: strings are attrs
    for dtype in ("<U2", "S2"):
        with pytest.raises(TypeError, match="strings are stored as attrs"):
            canonical_output(np.array(["ab"], dtype=dtype), node="nd")


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 3] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize(
    "damage", [lambda d: b"", _truncate, _flip], ids=["empty", "truncated", "flipped"]
)
def test_catalog_survives_a_damaged_cache(store, damage):
    write_pack(store, recipe(), [ok(f"a{i}", np.full(2, i)) for i in range(3)])
    load_catalog(store, "nd")
    store.put("cache/catalog/nd.npz", damage(store.get("cache/catalog/nd.npz")))
    assert sorted(load_catalog(store, "nd").ids) == ["a0", "a1", "a2"]


def test_a_kept_catalog_is_refreshed_like_a_fresh_load(store):
    """What ``flow watch`` does between builds: packs another writer published are
    added, collected ones dropped, and the cache file is rewritten only now and
    then (a stale one just means a few more manifests at the next cold load)."""
    from store.catalog import refresh_catalog

    first = write_pack(store, recipe(), [ok("a", np.ones(2)), ok("b", np.zeros(2))])
    cat = load_catalog(store, "nd")
    assert store.exists("cache/catalog/nd.npz") and cat._uncached == 0
    cached = store.get("cache/catalog/nd.npz")
    assert cat.rows_for("nd", "c") == [] and cat.previous("nd", "c") is None
    write_pack(store, recipe(), [ok("c", np.full(2, 3.0))])  # another writer
    store.delete([f"packs/nd/{first['id']}.json"])  # collected
    refresh_catalog(store, cat, cache_every=3)
    fresh = load_catalog(store, "nd", write_cache=False)
    assert cat.ids == fresh.ids == ["c"]
    assert cat.index == fresh.index and [p.id for p in cat.packs] == [p.id for p in fresh.packs]
    assert len(cat.rows_for("nd", "c")) == 1 and cat.previous("nd", "c") is not None
    assert cat.rows_for("nd", "a") == []
    # one pack came, one went: under cache_every=3 the cache file is left alone ...
    assert cat._uncached == 2 and store.get("cache/catalog/nd.npz") == cached
    write_pack(store, recipe(), [ok("d", np.ones(2))])
    refresh_catalog(store, cat, cache_every=3)
    # ... and rewritten at the third
    assert cat._uncached == 0
    assert load_catalog(store, "nd", write_cache=False).ids == cat.ids == ["c", "d"]
    assert store.get("cache/catalog/nd.npz") != cached


def test_a_build_saves_the_catalogs_it_loaded(tmp_path, monkeypatch):
    """The load after a build reads the catalog caches alone, no manifest: the build
    saved the catalogs it loaded.  Catalogs a caller keeps between builds (``flow
    watch``) are the caller's to save: a build given them leaves their caches."""
    import store.catalog as sc
    from engine import testing as ft
    from engine.builder import build

    data = tmp_path / "data"
    ft.write_synthetic_files(data, 6, size=8)
    st = open_store(str(tmp_path / "store"))
    kept: dict = {}
    items, sources = ft.synthetic_inputs(data, st)
    assert build(ft.synthetic_graph(), items, sources, st, catalogs=kept).ok
    assert len(kept) == 3 and all(c._uncached == 0 for c in kept.values())
    cached = {n: st.get(f"cache/catalog/{n}.npz") for n in kept}

    def no_manifests(store, node, ids):
        raise AssertionError(f"read {len(ids)} manifests of {node}")

    with monkeypatch.context() as m:
        m.setattr(sc, "_read_manifests", no_manifests)
        for n, cat in kept.items():
            assert load_catalog(st, n).ids == cat.ids and len(cat.ids) == 6

    ft.write_synthetic_files(data, 2, size=8, start=6)
    items, sources = ft.synthetic_inputs(data, st)
    assert build(ft.synthetic_graph(), items, sources, st, catalogs=kept).ok
    for n, cat in kept.items():
        assert cat._uncached > 0 and st.get(f"cache/catalog/{n}.npz") == cached[n]
        assert load_catalog(st, n).ids == cat.ids and len(cat.ids) == 8
