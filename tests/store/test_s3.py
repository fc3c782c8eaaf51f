"""The store on S3 (``s3://bucket/prefix``), against a moto server on loopback.

The whole conformance suite and the model test run on S3, with a real
conditional create (``If-None-Match: *``), so refs keep ``<seq>.json``
names and the suite's race tests run.  The rest pins what is particular to
object storage: the probe that keeps a server ignoring the condition from
being trusted, listings that see other hosts' writes, corruption caught on
read and by ``verify``, and how many requests a pack costs.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from flow.errors import CorruptObject
from store import open_store
from store.catalog import load_catalog
from store.fsspec import FsspecStore
from store.maintenance import verify
from store.packs import PackReader, write_pack
from store.refs import move_ref, read_ref, ref_history
from store.testing import StoreTests, _flip_byte, _ok, _recipe, run_threads, store_model_test

pytestmark = pytest.mark.slow

_SERVER: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _server(s3):
    _SERVER["s3"] = s3
    yield
    _SERVER.clear()


def _s3_store(name: str = "store", **extra) -> FsspecStore:
    s3 = _SERVER["s3"]
    store = open_store(s3.url(name), **s3.client_options, **extra)
    assert isinstance(store, FsspecStore)
    return store


class TestS3Store(StoreTests):
    def make_store(self, tmp_path):
        store = _s3_store(tmp_path.name[:40])
        assert store.supports_conditional  # the suite's race tests must run, not skip
        return store


TestS3StoreModel = store_model_test(_s3_store, max_examples=6, steps=8)


@pytest.fixture
def store():
    s = _s3_store()
    try:
        yield s
    finally:
        s.delete_tree("")


def test_conditional_create_is_the_servers(store, s3):
    """put_if_absent is one conditional PUT; refs keep plain ``<seq>.json`` names."""
    assert store.supports_conditional
    before = s3.requests()
    assert store.put_if_absent("x", b"1") is True
    assert store.put_if_absent("x", b"2") is False
    after = s3.requests()
    assert after.get("PUT", 0) - before.get("PUT", 0) == 2  # no check-then-write
    assert store.get("x") == b"1"
    with pytest.raises(FileExistsError):  # the server refuses it, not the client
        store.fs.pipe_file(store._p("x"), b"3", mode="create")
    move_ref(store, "r", {"v": 1})
    move_ref(store, "r", {"v": 2})
    assert store.list("refs/r") == ["000000000001.json", "000000000002.json"]
    assert not any(n.startswith("tmp") for n in store.list(""))  # the probe cleaned up


def test_a_server_ignoring_the_condition_is_not_trusted(store, monkeypatch):
    """A server that drops If-None-Match would let two writers win: the probe sees it."""
    fresh = FsspecStore(store.url, **store.storage_options)
    real = fresh.fs.pipe_file

    def pipe_file(path, data, mode="overwrite", **kw):
        return real(path, data, **kw)  # what such a server does: a plain PUT

    monkeypatch.setattr(fresh.fs, "pipe_file", pipe_file)
    assert fresh.supports_conditional is False
    assert fresh.put_if_absent("y", b"1") is True and fresh.put_if_absent("y", b"2") is False
    assert fresh.get("y") == b"1"
    # refs fall back to unique entry names: racing moves all stay in the history
    run_threads(4, lambda i: move_ref(fresh, "r", {"t": i}))
    names = fresh.list("refs/r")
    assert len(names) == 4 and all("-" in n for n in names)
    assert sorted(e["value"]["t"] for e in ref_history(fresh, "r")) == [0, 1, 2, 3]


def test_other_hosts_writes_are_seen_at_once(store, s3):
    """No listing cache: what another client writes is listed and found right away."""
    import boto3

    store.put("packs/n/a.json", b"{}")
    assert store.list("packs/n") == ["a.json"] and not store.exists("packs/n/b.json")
    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    key = f"{store.root.split('/', 1)[1]}/packs/n/b.json"
    client.put_object(Bucket=s3.bucket, Key=key, Body=b"{}")
    assert store.list("packs/n") == ["a.json", "b.json"] and store.exists("packs/n/b.json")
    client.delete_object(Bucket=s3.bucket, Key=key)
    assert store.list("packs/n") == ["a.json"] and not store.exists("packs/n/b.json")
    assert store.list("packs/n/a.json") == []  # a file is not a folder


def test_arrays_live_in_the_bucket(store, s3):
    """zarr writes through the store's storage options, into the bucket."""
    import boto3

    manifest = write_pack(store, _recipe(), [_ok(f"i{i}", np.arange(8) * i) for i in range(5)])
    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    prefix = store.root.split("/", 1)[1]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)["Contents"]}
    base = f"{prefix}/packs/nd/{manifest['id']}"
    assert f"{base}.json" in keys and f"{base}/_/zarr.json" in keys
    assert any(k.startswith(f"{base}/_/c/") for k in keys)
    got = PackReader.open(store, "nd", manifest["id"]).read([4, 0])
    np.testing.assert_array_equal(got[0], np.arange(8) * 4)


def test_verify_quarantines_a_corrupt_pack(store):
    good = write_pack(store, _recipe(), [_ok(f"g{i}", np.arange(16) + i) for i in range(3)])
    bad = write_pack(store, _recipe(), [_ok(f"b{i}", np.arange(16) - i) for i in range(3)])
    assert verify(store) == []
    [chunk] = [e.path for e in store.walk(f"packs/nd/{bad['id']}") if "/c/" in e.path]
    _flip_byte(store, chunk)
    with pytest.raises(CorruptObject):
        PackReader.open(store, "nd", bad["id"]).read([0])
    [problem] = verify(store)
    assert (problem.kind, problem.id, problem.items) == ("pack", bad["id"], 3)
    assert sorted(load_catalog(store, "nd").ids) == ["g0", "g1", "g2"]  # quarantined
    assert [p.id for p in load_catalog(store, "nd").packs] == [good["id"]]


def test_requests_per_pack(store, s3):
    """What a pack costs on S3: a dozen requests to write, 7 to read, whatever its size."""

    def requests(action) -> int:
        before = s3.requests()
        out = action()
        return sum(s3.requests().values()) - sum(before.values()), out

    costs = []
    for n in (5, 200):
        results = [_ok(f"i{i}", {"v": np.full(4, i, "<f4"), "m": np.eye(2) * i, "label": f"l{i}"})
                   for i in range(n)]  # fmt: skip
        wrote, manifest = requests(lambda r=results: write_pack(store, _recipe(), r))
        read, _ = requests(lambda m=manifest, n=n: PackReader.open(store, "nd", m["id"]).read(
            range(n)))  # fmt: skip
        costs.append((wrote, read))
    # writing: per array zarr's existence checks, its metadata and one chunk, then the
    # manifest, then a HEAD per array that its chunk survived publishing; reading: the
    # manifest, then per array its metadata, a HEAD that the chunk is there (zarr would
    # read a missing one as zeros) and the chunk
    assert costs[0] == costs[1], costs
    assert costs[0][0] <= 15 and costs[0][1] <= 7, costs


def test_concurrent_ref_moves_from_separate_stores(s3):
    """Writers with their own connections (as on separate hosts) serialize on the server."""
    url = s3.url("refs")
    stores = [open_store(url, **s3.client_options, skip_instance_cache=True) for _ in range(3)]
    try:
        run_threads(3, lambda i: [move_ref(stores[i], "shared", {"t": i, "m": m})
                                  for m in range(3)])  # fmt: skip
        hist = ref_history(stores[0], "shared")
        assert [e["seq"] for e in hist] == list(range(1, 10))
        assert sorted((e["value"]["t"], e["value"]["m"]) for e in hist) == [
            (t, m) for t in range(3) for m in range(3)
        ]
        assert read_ref(stores[1], "shared")["seq"] == 9
    finally:
        stores[0].delete_tree("")


def test_deletes_are_bulk_requests(s3):
    """delete and delete_tree send one DeleteObjects request per 1000 keys (gc on S3)."""
    store = _s3_store("delete")
    for i in range(30):
        store.put(f"a/b/{i}", b"1")
    store.put("a/bc", b"2")
    before = sum(s3.requests().values())
    store.delete([f"a/b/{i}" for i in range(10)] + ["a/b/never-was"])
    store.delete_tree("a/b")  # a listing, then one bulk delete
    assert sum(s3.requests().values()) - before == 3
    assert [e.path for e in store.walk("")] == ["a/bc"]
    store.delete_tree("")
    assert list(store.walk("")) == [] and store.list("") == []


def test_store_url_must_name_a_bucket_that_exists(s3):
    store = open_store(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x", **s3.client_options)
    with pytest.raises(FileNotFoundError):
        store.put("a", b"1")


def _client_error(code: str) -> OSError:
    """What s3fs raises for an S3 error it has no exception type for."""
    from botocore.exceptions import ClientError

    err = OSError(5, f"{code} from the server")
    err.__cause__ = ClientError({"Error": {"Code": code, "Message": "..."}}, "PutObject")
    return err


def test_conditional_write_conflicts_are_retried(store, monkeypatch):
    """AWS answers 409 ConditionalRequestConflict to a create racing another: retry it;
    a 412 without the If-None-Match detail is still "someone else created it"."""
    assert store.supports_conditional  # probed before the server is faked
    real = store.fs.pipe_file
    answers = [_client_error("ConditionalRequestConflict")]

    def pipe_file(path, data, **kw):
        if answers:
            raise answers.pop(0)
        return real(path, data, **kw)

    monkeypatch.setattr(store.fs, "pipe_file", pipe_file)
    assert store.put_if_absent("c", b"1") is True and store.get("c") == b"1"
    answers.append(_client_error("PreconditionFailed"))
    assert store.put_if_absent("d", b"1") is False and not store.exists("d")
    answers.append(_client_error("AccessDenied"))
    with pytest.raises(OSError, match="AccessDenied"):
        store.put_if_absent("e", b"1")


def test_exists_does_not_hide_errors(store, monkeypatch):
    """Only "not found" is False: a refused or failed request must not read as a
    missing chunk (which verify would take for corruption and quarantine)."""
    store.put("x", b"1")

    def info(path, **kw):
        raise PermissionError("AccessDenied")

    monkeypatch.setattr(store.fs, "info", info)
    with pytest.raises(PermissionError):
        store.exists("x")
