"""Helpers for the process-level suites: real Dask processes, subprocess builds
that get killed, and a helper that reads everything a store holds.  The fixtures
are registered for every test folder by the root ``conftest.py``.

* ``dask_scheduler`` (module) / ``cluster`` (function): a ``dask scheduler`` on
  loopback plus two ``dask worker --no-nanny`` processes (a killed worker stays
  dead).  Every process is started in its own session and its process group is
  SIGKILLed at teardown, so nothing outlives the test.
* ``spawn_build``: runs :data:`BUILD_SCRIPT` (a build of the synthetic pipeline)
  in a subprocess, to be killed or interrupted; killed at teardown too.
* ``reference``: the content of a clean ``sync`` build, computed once per
  session for each (item count, parameters).
* :func:`store_content` / :func:`assert_same_content` (through the
  ``content`` fixture): every (recipe key, content key) pair a store holds,
  and every value read back, checked against its content key.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.builder import BuildReport, build
from engine.executors import get_executor
from engine.testing import synthetic_graph, synthetic_inputs, write_synthetic_files
from flow.keys import key
from store import open_store
from store.catalog import load_catalog
from store.objects import read_object, read_object_manifests
from store.packs import PackReader

ITEM_NODES = ("parsed", "smoothed", "histogram")
SET_NODES = ("mean_histogram",)
# ~5 ms per 1000 units of work per item on an idle core: batches of 10 items
# take a few tenths of a second, long enough to kill something mid-batch.
SLOW = {"smoothed": {"work": 4000}}
N_SLOW = 120
START_TIMEOUT = 90.0  # seconds for processes to come up on a loaded machine
BUILD_TIMEOUT = 180.0


def wait_until(cond: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def count_manifests(store_root: Path, node: str) -> int:
    """Published packs of ``node`` (a pack exists when its manifest does)."""
    try:
        return sum(1 for n in os.listdir(store_root / "packs" / node) if n.endswith(".json"))
    except FileNotFoundError:
        return 0


def manifest_pids(store_root: Path) -> set[int]:
    """Process ids recorded in every published pack manifest (who wrote it)."""
    pids = set()
    for node in ITEM_NODES:
        folder = store_root / "packs" / node
        if folder.is_dir():
            for p in folder.glob("*.json"):
                pids.add(json.loads(p.read_bytes())["pid"])
    return pids


# --------------------------------------------------------------------------
# processes


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class Processes:
    """Started processes, each in its own session; all SIGKILLed by :meth:`close`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}
        self._files: list[Any] = []

    def start(self, args: list[str], log_name: str, **kw: Any) -> subprocess.Popen:
        log = self.folder / log_name
        fh = open(log, "wb")  # noqa: SIM115 -- closed in close()
        self._files.append(fh)
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, **kw)  # fmt: skip
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return _tail(self.logs[proc.pid])

    def close(self) -> None:
        for proc in self.procs:
            _kill_group(proc)
        for fh in self._files:
            fh.close()
        self.procs.clear()
        self._files.clear()


@dataclass
class Cluster:
    """A scheduler address, its worker processes and an admin client."""

    address: str
    procs: Processes
    admin: Any  # distributed.Client, for waiting and asking the scheduler
    workers: list[subprocess.Popen] = field(default_factory=list)

    def add_worker(self, name: str) -> subprocess.Popen:
        args = [sys.executable, "-m", "distributed.cli.dask_worker", self.address,
                "--nthreads", "1", "--nworkers", "1", "--no-nanny", "--memory-limit", "0",
                "--no-dashboard", "--death-timeout", "60", "--name", name]  # fmt: skip
        proc = self.procs.start(args, f"worker-{name}.log", cwd=_REPO)
        self.workers.append(proc)
        return proc

    def wait_for_workers(self, n: int) -> None:
        try:
            self.admin.wait_for_workers(n, timeout=START_TIMEOUT)
        except TimeoutError:
            logs = "\n".join(self.procs.log(w) for w in self.workers)
            raise AssertionError(f"{n} dask workers did not connect:\n{logs}") from None

    def n_workers(self) -> int:
        return len(self.admin.scheduler_info(n_workers=-1)["workers"])

    def address_of(self, proc: subprocess.Popen) -> str:
        """The worker address of a worker process (``--no-nanny``: same pid)."""
        pids = self.admin.run(os.getpid)
        for addr, pid in pids.items():
            if pid == proc.pid:
                return addr
        raise AssertionError(f"worker pid {proc.pid} is not connected ({pids})")

    def stop_workers(self) -> None:
        for w in self.workers:
            _kill_group(w)
        self.workers.clear()
        wait_until(lambda: self.n_workers() == 0, START_TIMEOUT, "the scheduler to drop workers")


_REPO = Path(__file__).resolve().parents[1]


def start_scheduler(
    procs: Processes, *extra: str, idle_timeout: int = 900
) -> tuple[subprocess.Popen, str]:
    """A ``dask scheduler`` on 127.0.0.1 (random port; ``extra`` arguments added) and
    its address once it listens; the test skips if it exits or never comes up."""
    sched_file = procs.folder / "scheduler.json"
    # --idle-timeout: a scheduler orphaned by a crashed test run still exits
    args = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
            "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file),
            "--idle-timeout", str(idle_timeout), *extra]  # fmt: skip
    proc = procs.start(args, "scheduler.log", cwd=_REPO)

    def address() -> str | None:
        if proc.poll() is not None:
            pytest.skip(f"dask scheduler exited ({proc.returncode}): {procs.log(proc)}")
        try:
            return json.loads(sched_file.read_text())["address"]
        except (OSError, ValueError, KeyError):
            return None

    try:
        return proc, wait_until(address, START_TIMEOUT, "the dask scheduler")
    except AssertionError:
        pytest.skip(f"dask scheduler did not start: {procs.log(proc)}")


@pytest.fixture(scope="module")
def dask_scheduler(tmp_path_factory) -> Iterator[tuple[str, Processes]]:
    """A ``dask scheduler`` on 127.0.0.1 (random port), shared by a module's tests."""
    pytest.importorskip("distributed")
    procs = Processes(tmp_path_factory.mktemp("dask"))
    try:
        yield start_scheduler(procs)[1], procs
    finally:
        procs.close()


@pytest.fixture
def cluster(dask_scheduler, tmp_path) -> Iterator[Cluster]:
    """The module's scheduler with two fresh single-threaded workers."""
    from distributed import Client

    addr, _ = dask_scheduler
    procs = Processes(tmp_path)
    admin = Client(addr, timeout="30s")
    c = Cluster(addr, procs, admin)
    try:
        c.add_worker("a")
        c.add_worker("b")
        c.wait_for_workers(2)
        yield c
    finally:
        try:
            c.stop_workers()
        finally:
            admin.close()
            procs.close()


# --------------------------------------------------------------------------
# subprocess builds

BUILD_SCRIPT = r'''
"""A build of flow's synthetic pipeline, configured by one JSON argument."""
import json
import os
import sys

cfg = json.loads(sys.argv[1])
if cfg.get("die_before_manifest"):
    # simulate a writer killed after its arrays are written, before the
    # manifest is published: the manifest is the one ``put`` of a pack
    from store.local import LocalStore

    _put = LocalStore.put
    prefix = cfg["die_before_manifest"]

    def put(self, path, data):
        if path.startswith(prefix) and path.endswith(".json"):
            os._exit(17)
        return _put(self, path, data)

    LocalStore.put = put

if cfg.get("pack_delay"):
    # slow storage: keeps a build running long enough to be stopped midway
    import time

    import store.packs

    _write_pack = store.packs.write_pack

    def write_pack(*args, **kw):
        time.sleep(cfg["pack_delay"])
        return _write_pack(*args, **kw)

    store.packs.write_pack = write_pack
if cfg.get("sigint_in_wait"):
    # deliver SIGINT at one precise moment an async signal can hit: inside
    # concurrent.futures.wait, after it locked a running future's condition
    # and before it locked the rest (and released them all)
    import concurrent.futures._base as _base
    import signal
    import threading

    _fired = []

    def _enter(self):
        for f in self.futures:
            f._condition.acquire()
            if (not _fired and f._state == _base.RUNNING
                    and threading.current_thread() is threading.main_thread()):
                _fired.append(True)
                os.kill(os.getpid(), signal.SIGINT)

    _base._AcquireFutures.__enter__ = _enter

from engine.builder import build
from engine.executors import get_executor
from engine.testing import synthetic_graph, synthetic_inputs
from store import open_store

st = open_store(cfg["store"])
items, sources = synthetic_inputs(cfg["data"], st)
print("building", flush=True)
with get_executor(cfg["executor"], cfg.get("workers")) as ex:
    rep = build(synthetic_graph(cfg["params"]), items, sources, st, ex, progress=False,
                batch_size=cfg.get("batch_size"))
print(json.dumps({"ok": rep.ok, "interrupted": rep.interrupted, "error": rep.error,
                  "computed": {k: v.computed for k, v in rep.steps.items()}}), flush=True)
sys.exit(0 if rep.ok else 1)
'''


@pytest.fixture
def spawn_build(tmp_path) -> Iterator[Callable[..., subprocess.Popen]]:
    """``spawn_build(store, data, params, executor="threads", **cfg)`` -> Popen.

    The subprocess's output goes to a log; ``spawn_build.log(proc)`` reads it.
    """
    # the script's folder is sys.path[0]: keep it apart from the test's
    # folders, or a store folder named "store" shadows the ``store`` package
    (tmp_path / "script").mkdir()
    script = tmp_path / "script" / "build_script.py"
    script.write_text(BUILD_SCRIPT)
    procs = Processes(tmp_path)
    counter = iter(range(1_000_000))

    def spawn(store: Path, data: Path, params: dict, executor: str = "threads",
              **cfg: Any) -> subprocess.Popen:  # fmt: skip
        doc = {"store": str(store), "data": str(data), "params": params,
               "executor": executor, **cfg}  # fmt: skip
        return procs.start([sys.executable, str(script), json.dumps(doc)],
                           f"build-{next(counter)}.log", cwd=_REPO)  # fmt: skip

    spawn.log = procs.log  # type: ignore[attr-defined]
    try:
        yield spawn
    finally:
        procs.close()


# --------------------------------------------------------------------------
# what a store holds


@dataclass
class Content:
    """Per node: the (rkey, ckey) pairs stored, one value per rkey, item ids."""

    pairs: dict[str, set[tuple[bytes, bytes]]]
    values: dict[str, dict[bytes, Any]]
    ids: dict[str, set[str]]
    rows: dict[str, int]  # stored rows (copies included) per item node


def same_value(a: Any, b: Any) -> bool:
    """Exact equality: same dtype, shape and bytes for arrays, recursively for dicts."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.tobytes() == b.tobytes()
        )
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict)
            and isinstance(b, dict)
            and a.keys() == b.keys()
            and all(same_value(a[k], b[k]) for k in a)
        )
    return type(a) is type(b) and a == b


def store_content(st: Any) -> Content:
    """Everything ``st`` holds for the synthetic pipeline, every value read back.

    Asserts integrity on the way: every copy of a recipe key has the same
    content key, and every value read back keys to its content key.
    """
    pairs: dict[str, set] = {}
    values: dict[str, dict] = {}
    ids: dict[str, set] = {}
    rows: dict[str, int] = {}
    for node in ITEM_NODES:
        cat = load_catalog(st, node, write_cache=False)
        by_pack: dict[str, list[int]] = {}
        for row in range(len(cat)):
            by_pack.setdefault(cat.location(row)[0], []).append(row)
        vals: dict[bytes, Any] = {}
        for pack_id, prows in by_pack.items():
            reader = PackReader.open(st, node, pack_id)
            got = reader.read([cat.location(r)[1] for r in prows])
            for r, v in zip(prows, got):
                rk, ck = cat.rkeys[r].tobytes(), cat.ckey(r)
                assert key(v) == ck, f"{node} {cat.ids[r]}: value read back does not key to ckey"
                if rk in vals:
                    assert same_value(vals[rk], v), f"{node} {cat.ids[r]}: copies differ"
                vals[rk] = v
        pairs[node] = {(cat.rkeys[r].tobytes(), cat.ckey(r)) for r in range(len(cat))}
        values[node] = vals
        ids[node] = set(cat.ids)
        rows[node] = len(cat)
    for node in SET_NODES:
        docs = [d for d in read_object_manifests(st, node) if "failure" not in d]
        pairs[node] = {(bytes.fromhex(d["rkey"]), bytes.fromhex(d["ckey"])) for d in docs}
        values[node] = {}
        for d in docs:
            v = read_object(st, node, bytes.fromhex(d["rkey"]), d)
            assert key(v).hex() == d["ckey"], f"{node}: object does not key to its ckey"
            values[node][bytes.fromhex(d["rkey"])] = v
    return Content(pairs, values, ids, rows)


def assert_same_content(got: Content, want: Content) -> None:
    """Same content keys for the same recipe keys, and the same values, node by node."""
    for node in (*ITEM_NODES, *SET_NODES):
        extra = got.pairs[node] - want.pairs[node]
        missing = want.pairs[node] - got.pairs[node]
        assert not extra and not missing, (
            f"{node}: {len(extra)} (rkey, ckey) pairs not in the reference, "
            f"{len(missing)} reference pairs missing"
        )
        for rk, v in want.values[node].items():
            assert same_value(got.values[node][rk], v), f"{node}: value of {rk.hex()} differs"


@dataclass
class Reference:
    data: Path  # the synthetic files (read-only: don't modify)
    n: int
    params: dict
    content: Content
    report: BuildReport


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Callable[[int, dict | None], Reference]:
    """``reference(n, params)``: files and the content of a clean sync build (cached)."""
    cache: dict[str, Reference] = {}

    def get(n: int, params: dict | None = None) -> Reference:
        params = params or {}
        tag = json.dumps([n, params], sort_keys=True)
        if tag not in cache:
            folder = tmp_path_factory.mktemp("ref")
            write_synthetic_files(folder / "data", n)
            st = open_store(folder / "store")
            items, sources = synthetic_inputs(folder / "data", st)
            with get_executor("sync") as ex:
                rep = build(synthetic_graph(params), items, sources, st, ex, progress=False)
            assert rep.ok, rep.failures
            cache[tag] = Reference(folder / "data", n, params, store_content(st), rep)
        return cache[tag]

    return get


def build_here(store_root: Path, data: Path, params: dict, scheduler: str = "sync",
               **kw: Any) -> BuildReport:  # fmt: skip
    """A build in this process (``kw`` goes to :func:`engine.builder.build`)."""
    st = open_store(store_root)
    items, sources = synthetic_inputs(data, st)
    with get_executor(scheduler) as ex:
        return build(synthetic_graph(params), items, sources, st, ex, progress=False, **kw)
