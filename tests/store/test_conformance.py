"""Every backend passes :class:`store.testing.StoreTests` and the model test.

A new backend is one ``StoreTests`` subclass and one ``store_model_test``
line (S3 on moto: ``make_store`` returns ``open_store("s3://bucket/<unique>",
endpoint_url=...)``).  Known gaps of a backend are pinned below as strict
xfails, so fixing one turns the suite red until its marker is removed.
"""

from __future__ import annotations

import tempfile
import threading
import uuid

from store import open_store
from store.fsspec import FsspecStore
from store.local import LocalStore
from store.refs import move_ref, ref_history
from store.testing import StoreTests, run_threads, store_model_test


def _memory_store() -> FsspecStore:
    store = open_store(f"memory://flow-test-{uuid.uuid4().hex}")
    assert isinstance(store, FsspecStore)
    return store


class TestLocalStore(StoreTests):
    def make_store(self, tmp_path):
        return LocalStore(tmp_path / "store")


class TestMemoryStore(StoreTests):
    def make_store(self, tmp_path):
        return _memory_store()


TestLocalStoreModel = store_model_test(lambda: LocalStore(tempfile.mkdtemp(prefix="flow-model-")))
TestMemoryStoreModel = store_model_test(_memory_store)


def test_open_store_picks_the_backend(tmp_path):
    assert isinstance(open_store(tmp_path), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert open_store(f"file://{tmp_path}").root == tmp_path
    mem = open_store("memory://some-name/sub")
    assert isinstance(mem, FsspecStore) and not mem.supports_conditional
    assert LocalStore(tmp_path).supports_conditional and LocalStore(tmp_path).supports_local_paths


# --------------------------------------------------------------------------
# known gaps


def test_memory_list_of_a_file_is_empty():
    store = _memory_store()
    store.put("a/b", b"1")
    assert store.list("a/b") == []


def test_memory_concurrent_ref_moves_with_interleaved_checks():
    store = _memory_store()
    move_ref(store, "r", {"t": "base"})
    barrier = threading.Barrier(2)
    real_exists = store.fs.exists

    def exists(path, **kw):  # both movers check before either writes
        found = real_exists(path, **kw)
        if "/refs/r/" in path:
            barrier.wait(timeout=5)
        return found

    store.fs.exists = exists
    try:
        run_threads(2, lambda i: move_ref(store, "r", {"t": i}))
    finally:
        del store.fs.exists
    assert len(ref_history(store, "r")) == 3
