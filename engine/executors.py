"""Executors: where a build's tasks run.  One engine, thin front-ends.

Every executor offers the same few calls -- ``submit(fn, *args)``,
``wait_any(futures, timeout)``, ``result(future)``, ``cancel(futures)``,
``close()`` -- and the builder (:mod:`engine.builder`) uses nothing else, so
the same build runs:

* ``sync``: each task at once in the calling thread (debugging, tests);
* ``threads``: on a thread pool of this process;
* ``local``: on a local ``dask.distributed`` cluster (the default; the
  dashboard link is printed), started lazily -- a build with nothing stale
  starts nothing, and one with little work runs in threads instead
  (:class:`LazyExecutor`);
* ``tcp://host:port`` / ``tls://...``: on an existing scheduler;
* Slurm jobs through dask-jobqueue (:mod:`engine.cluster`).

``engine.testing.ExecutorTests`` is the conformance suite every one of them
passes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from flow.errors import FlowError
from flow.plan import MISSING, PENDING, Plan

if TYPE_CHECKING:  # imported where used: a no-op build starts no executor
    import concurrent.futures as cf

__all__ = [
    "DaskExecutor",
    "Executor",
    "LazyExecutor",
    "SyncExecutor",
    "ThreadExecutor",
    "get_executor",
    "local_cluster",
    "tls_security",
]

# --------------------------------------------------------------------------
# executors


class Executor:
    """Submit functions, wait for any to finish.  ``n_workers`` sizes batches."""

    n_workers: int = 1
    dashboard: str | None = None
    name: str = "executor"

    def submit(self, fn: Callable, *args: Any) -> Any:
        raise NotImplementedError

    def wait_any(self, futures: set, timeout: float | None = None) -> tuple[set, set]:
        """The futures done (maybe none, after ``timeout`` seconds) and the rest."""
        import concurrent.futures as cf

        done, pending = cf.wait(futures, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return set(done), set(pending)

    def result(self, future: Any) -> Any:
        return future.result()

    def cancel(self, futures: Iterable) -> None:
        for f in futures:
            f.cancel()

    def subscribe(self, topic: str, handler: Callable[[Any], None]) -> None:
        """Call ``handler(event)`` for each event tasks send on ``topic`` from other
        processes (Dask's ``log_event``); executors running tasks in this process
        have none to forward."""

    def unsubscribe(self, topic: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SyncExecutor(Executor):
    """Runs every task at once in the caller's thread (for debugging and tests)."""

    name = "sync"

    def submit(self, fn: Callable, *args: Any) -> cf.Future:
        import concurrent.futures as cf

        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            fut.set_exception(e)
        return fut


class ThreadExecutor(Executor):
    name = "threads"

    def __init__(self, n_workers: int | None = None):
        import concurrent.futures as cf

        self.n_workers = n_workers or os.cpu_count() or 1
        self._pool = cf.ThreadPoolExecutor(self.n_workers, thread_name_prefix="flow")

    def submit(self, fn: Callable, *args: Any) -> cf.Future:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor(Executor):
    """A dask.distributed client: a local cluster, or an existing scheduler."""

    name = "dask"

    def __init__(
        self,
        address: str | None = None,
        n_workers: int | None = None,
        security: Any = None,
        retries: int = 2,
        cluster: Any = None,
    ):
        from distributed import Client

        self.retries = retries
        self._cluster = None
        if cluster is not None:
            self.client = Client(cluster, security=security)
        elif address is None:
            import logging

            n = n_workers or os.cpu_count() or 1
            # the scheduler runs here: its chatter when workers go (a Ctrl-C, the
            # close at the end) is not the user's business; errors still show
            quiet = logging.getLogger("distributed")
            self._log_level = quiet.level
            quiet.setLevel(max(logging.ERROR, quiet.level))
            self._cluster = local_cluster(n)
            try:
                self.client = Client(self._cluster)
                self.client.wait_for_workers(n, timeout=WORKERS_START_TIMEOUT)
            except BaseException as e:
                self._cluster.close()
                if isinstance(e, TimeoutError):
                    raise FlowError(
                        f"the local Dask cluster's {n} worker(s) did not start within "
                        f"{WORKERS_START_TIMEOUT:.0f} s"
                    ) from None
                raise
        else:
            self.client = Client(address, security=security, timeout="30s")
        self.dashboard = getattr(self.client, "dashboard_link", None)
        self.name = "local" if address is None and cluster is None else str(address or cluster)

    @property
    def n_workers(self) -> int:  # type: ignore[override]
        try:
            info = self.client.scheduler_info(n_workers=-1)
            return max(1, sum(w.get("nthreads", 1) for w in info["workers"].values()))
        except Exception:
            return 1

    def submit(self, fn: Callable, *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False, retries=self.retries)

    def wait_any(self, futures: set, timeout: float | None = None) -> tuple[set, set]:
        from distributed import wait

        try:
            res = wait(list(futures), timeout=timeout, return_when="FIRST_COMPLETED")
        except TimeoutError:
            return set(), set(futures)
        return set(res.done), set(res.not_done)

    def cancel(self, futures: Iterable) -> None:
        futures = list(futures)
        if futures:
            self.client.cancel(futures)

    def subscribe(self, topic: str, handler: Callable[[Any], None]) -> None:
        self.client.subscribe_topic(topic, handler)

    def unsubscribe(self, topic: str) -> None:
        with contextlib.suppress(Exception):  # a lost scheduler: nothing to undo
            self.client.unsubscribe_topic(topic)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self._cluster is not None:
                try:
                    self._cluster.close()
                finally:
                    import logging

                    logging.getLogger("distributed").setLevel(self._log_level)


#: seconds a local cluster's workers may take to start and connect
WORKERS_START_TIMEOUT = 120.0


def local_cluster(n_workers: int, threads_per_worker: int = 1) -> Any:
    """A local ``dask.distributed`` cluster: its scheduler in this process, each worker
    (a nanny and its worker process) started with ``python -m dask spec`` in a
    session of its own.

    A terminal's Ctrl-C (SIGINT to the whole foreground process group) therefore
    reaches the build's client only: it stops the build and closes the cluster,
    instead of killing workers while they start (``LocalCluster``'s workers share
    the terminal's process group: an interrupt during start-up printed their
    tracebacks and left the build without workers).  A worker whose client died
    without closing it exits ``death_timeout`` seconds after losing the scheduler.
    """
    import logging

    from distributed import Scheduler
    from distributed.deploy.spec import SpecCluster
    from distributed.worker_memory import parse_memory_limit

    worker = {
        "cls": _session_worker(),
        "options": {
            "worker_kwargs": {
                "host": "127.0.0.1",
                "nthreads": threads_per_worker,
                "memory_limit": parse_memory_limit(
                    "auto", threads_per_worker, n_workers, logger=logging.getLogger(__name__)
                ),
                "death_timeout": 60,
                "silence_logs": logging.ERROR,
            }
        },
    }
    return SpecCluster(
        workers={i: worker for i in range(n_workers)},
        scheduler={
            "cls": Scheduler,
            "options": {"host": "127.0.0.1", "port": 0, "dashboard_address": ":0"},
        },
        worker=worker,
        name="flow-local",
        silence_logs=logging.ERROR,
    )


_SESSION_WORKER: list[type] = []


def _session_worker() -> type:
    """distributed's ``SubprocessWorker``, started in a new session (defined on first
    use: importing distributed costs a second that a no-op build never pays)."""
    if _SESSION_WORKER:
        return _SESSION_WORKER[0]
    import asyncio
    import json
    import subprocess
    import sys

    from distributed.deploy.subprocess import SubprocessWorker

    class SessionWorker(SubprocessWorker):
        async def _start(self) -> None:
            spec = {"cls": self.worker_class, "opts": {**self.worker_kwargs, "name": self.name}}
            cmd = [sys.executable, "-m", "dask", "spec", self.scheduler, "--spec", json.dumps(spec)]
            self.process = await asyncio.create_subprocess_exec(
                *cmd, stdin=subprocess.DEVNULL, start_new_session=True, env=_worker_env()
            )

    _SESSION_WORKER.append(SessionWorker)
    return SessionWorker


def _worker_env() -> dict[str, str]:
    """This process's environment, with the folder flow's packages are imported from
    on PYTHONPATH (a checkout run without installing it) and quiet Dask logs."""
    import engine

    root = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = root + (os.pathsep + path if path else "")
    env.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    return env


class LazyExecutor(Executor):
    """An executor started on first use, so that a build with nothing stale starts no
    cluster (a no-op ``flow build`` then costs planning alone, not a Dask start-up).
    ``on_start(executor)`` runs once it is up (e.g. to print the dashboard)."""

    def __init__(
        self,
        start: Callable[[], Executor],
        name: str,
        on_start: Callable[[Executor], None] | None = None,
        threads_below: int = 0,
        workers: int | None = None,
    ):
        self._start, self._on_start, self._ex, self.name = start, on_start, None, name
        self.threads_below, self._workers = threads_below, workers
        self._topics: dict[str, Callable[[Any], None]] = {}

    def expect(self, p: Plan) -> None:
        """Told the plan before any work: when fewer than ``threads_below`` item
        computations are stale (an incremental build of a few new files), run them
        in threads of this process instead of starting a Dask cluster, which takes
        seconds (more than the work itself)."""
        if self._ex is not None or self.threads_below <= 0:
            return
        work = sum(
            int(np.isin(sp.status, (MISSING, PENDING)).sum())
            for sp in p.steps.values()
            if sp.kind == "item"
        )
        if work < self.threads_below:
            workers = self._workers
            self._start, self.name = (lambda: ThreadExecutor(workers)), "threads"

    @property
    def started(self) -> Executor:
        if self._ex is None:
            self._ex = self._start()
            for topic, handler in self._topics.items():
                self._ex.subscribe(topic, handler)
            if self._on_start is not None:
                self._on_start(self._ex)
        return self._ex

    def subscribe(self, topic: str, handler: Callable[[Any], None]) -> None:
        self._topics[topic] = handler
        if self._ex is not None:
            self._ex.subscribe(topic, handler)

    def unsubscribe(self, topic: str) -> None:
        self._topics.pop(topic, None)
        if self._ex is not None:
            self._ex.unsubscribe(topic)

    @property
    def n_workers(self) -> int:  # type: ignore[override]
        return self.started.n_workers

    @property
    def dashboard(self) -> str | None:  # type: ignore[override]
        return self._ex.dashboard if self._ex is not None else None

    def submit(self, fn: Callable, *args: Any) -> Any:
        return self.started.submit(fn, *args)

    def wait_any(self, futures: set, timeout: float | None = None) -> tuple[set, set]:
        return self.started.wait_any(futures, timeout)

    def result(self, future: Any) -> Any:
        return self.started.result(future)

    def cancel(self, futures: Iterable) -> None:
        if self._ex is not None:
            self._ex.cancel(futures)

    def close(self) -> None:
        if self._ex is not None:
            self._ex.close()


def tls_security(
    ca_file: str | None = None, cert: str | None = None, key: str | None = None
) -> Any:
    """dask's ``Security`` for a ``tls://`` scheduler from PEM files (None: none given,
    dask's own configuration applies)."""
    if not (ca_file or cert or key):
        return None
    if not (ca_file and cert):
        raise FlowError("TLS needs a CA file and a client certificate (and its key, if separate)")
    from distributed.security import Security

    return Security(
        tls_ca_file=ca_file,
        tls_client_cert=cert,
        tls_client_key=key or None,
        require_encryption=True,
    )


def get_executor(
    scheduler: str = "local",
    workers: int | None = None,
    *,
    lazy: bool = False,
    on_start: Callable[[Executor], None] | None = None,
    threads_below: int = 0,
    **kw: Any,
) -> Executor:
    """``sync``, ``threads``, ``local`` (a local Dask cluster) or a scheduler address.

    ``lazy=True``: a Dask executor connects (or starts its cluster) on first use;
    with ``threads_below=N`` a ``local`` one is not started at all for a build
    with fewer than N stale item computations: threads of this process run them."""
    if scheduler == "sync":
        return SyncExecutor()
    if scheduler == "threads":
        return ThreadExecutor(workers)
    if scheduler in ("local", "distributed") or "://" in scheduler:
        address = None if scheduler in ("local", "distributed") else scheduler
        if lazy:
            name = "local" if address is None else address
            return LazyExecutor(
                lambda: DaskExecutor(address, workers, **kw),
                name,
                on_start,
                threads_below=threads_below if address is None else 0,
                workers=workers,
            )
        return DaskExecutor(address, workers, **kw)
    raise FlowError(f"unknown scheduler {scheduler!r}: use sync, threads, local or tcp://host:port")
