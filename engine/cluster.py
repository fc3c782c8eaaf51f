"""Builds on a batch cluster: Dask workers started as Slurm jobs, or the whole
build as one Slurm job.

Two ways to use a Slurm cluster, both configured by the ``[cluster]`` table of
``flow.toml`` (see :data:`KEYS`)::

    [cluster]
    partition = "cpu"
    cores = 4            # per job
    memory = "8GB"       # per job
    walltime = "02:00:00"
    jobs = 4             # a fixed number of worker jobs ...
    # adaptive_min = 0   # ... or as many as the work needs, between these
    # adaptive_max = 16

* ``flow build --cluster slurm``: the build runs where it is started (a login
  node); :func:`cluster_executor` makes a dask-jobqueue ``SLURMCluster`` (its
  scheduler in this process), checks the worker job script with ``sbatch
  --test-only``, submits the jobs -- each starts ``processes`` Dask workers
  of ``cores / processes`` threads that connect back -- and the build
  schedules its batches on them like on any Dask cluster.  Closing the
  executor (at the end of the build, on an error, Ctrl-C or SIGTERM) cancels
  every job; jobs whose client died without closing exit by themselves
  ``death_timeout`` seconds after losing the scheduler.
* ``flow submit`` (:mod:`cli.cluster`) writes an sbatch script that runs
  ``flow build`` on a local Dask cluster inside one allocation of ``cores``
  CPUs; nothing needs to stay running on the login node.

``--cluster local`` makes a ``LocalCluster`` of the same shape (``jobs x
processes`` workers), to try a configuration without a batch system.

dask-jobqueue is an optional dependency (``pip install flow-cbir[cluster]``),
imported only when a Slurm cluster is made.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine.executors import DaskExecutor
from flow.errors import ConfigError, FlowError

__all__ = [
    "KEYS",
    "LIVE_STATES",
    "ClusterConfig",
    "ClusterExecutor",
    "check_job_script",
    "cluster_config",
    "cluster_executor",
    "job_states",
    "make_cluster",
    "slurm_cluster_class",
    "slurm_command",
]

CLUSTER_TYPES = ("slurm", "local")

#: the keys of ``[cluster]``, and what each means
KEYS = {
    "partition": "Slurm partition of every job (#SBATCH -p); 'queue' is a synonym",
    "queue": "synonym of partition",
    "account": "Slurm account charged (#SBATCH -A)",
    "cores": "CPUs per job (#SBATCH --cpus-per-task); default 1",
    "processes": "Dask worker processes per job, cores/processes threads each; default cores",
    "memory": "memory per job, e.g. '4GB' (#SBATCH --mem); default '2GB'",
    "walltime": "time limit per job, [D-]HH:MM:SS (#SBATCH -t); default '01:00:00'",
    "jobs": "a fixed number of worker jobs (default 1 unless adaptive_max is set)",
    "adaptive_min": "adaptive: fewest worker jobs kept (default 0)",
    "adaptive_max": "adaptive: most worker jobs; setting it makes the cluster adaptive",
    "job_extra": "more #SBATCH directives, e.g. ['--qos=long', '--constraint=avx2']",
    "prologue": "shell lines run in each job before the workers start (module load ...)",
    "python": "the Python that runs on the compute nodes (default: this one)",
    "local_directory": "node-local scratch folder for the workers",
    "log_directory": "folder of job scripts and logs (default .flow/slurm beside flow.toml)",
    "interface": "network interface the workers and scheduler talk on (e.g. ib0)",
    "death_timeout": "seconds a worker waits for a lost scheduler before exiting (60)",
    "start_timeout": "seconds to wait for the first worker before failing (300; 0: forever)",
    "dashboard_address": "where the scheduler serves its dashboard (':8787')",
    "job_name": "Slurm job name of worker jobs (flow-worker)",
}

_WALLTIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


@dataclass(frozen=True)
class ClusterConfig:
    """The validated ``[cluster]`` table (paths absolute)."""

    partition: str | None = None
    account: str | None = None
    cores: int = 1
    processes: int = 1
    memory: str = "2GB"
    walltime: str = "01:00:00"
    jobs: int = 1
    adaptive_min: int | None = None
    adaptive_max: int | None = None
    job_extra: tuple[str, ...] = ()
    prologue: tuple[str, ...] = ()
    python: str | None = None
    local_directory: str | None = None
    log_directory: str = ".flow/slurm"
    interface: str | None = None
    death_timeout: float = 60.0
    start_timeout: float = 300.0
    dashboard_address: str = ":8787"
    job_name: str = "flow-worker"

    @property
    def adaptive(self) -> bool:
        return self.adaptive_max is not None

    @property
    def max_jobs(self) -> int:
        return self.adaptive_max if self.adaptive_max is not None else self.jobs

    @property
    def threads(self) -> int:
        """Threads per worker process."""
        return self.cores // self.processes

    def describe(self) -> str:
        jobs = (
            f"{self.adaptive_min or 0}..{self.adaptive_max} jobs (adaptive)"
            if self.adaptive
            else f"{self.jobs} job{'s' * (self.jobs > 1)}"
        )
        return f"{jobs} x {self.cores} core(s), {self.memory}, {self.walltime}" + (
            f" on partition {self.partition}" if self.partition else ""
        )


def cluster_config(
    table: Mapping[str, Any] | None, where: str = "[cluster]", root: str | os.PathLike | None = None
) -> ClusterConfig:
    """Check a ``[cluster]`` table; every mistake is a :class:`ConfigError` naming the key."""
    if table is not None and not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table, got {table!r}")
    table = dict(table or {})
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        hints = [
            f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, KEYS, 1)) else ""
            for k in unknown
        ]
        raise ConfigError(
            f"{where}: unknown key{'s' * (len(unknown) > 1)} "
            + ", ".join(f"{k!r}{h}" for k, h in zip(unknown, hints))
            + f" (allowed: {', '.join(KEYS)})"
        )

    def text(k: str) -> str | None:
        v = table.get(k)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ConfigError(f"{where}: {k} must be a non-empty string, got {v!r}")
        return v

    def count(k: str, low: int) -> int | None:
        v = table.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise ConfigError(f"{where}: {k} must be an integer >= {low}, got {v!r}")
        return v

    def secs(k: str, default: float) -> float:
        v = table.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ConfigError(f"{where}: {k} must be a number of seconds >= 0, got {v!r}")
        return float(v)

    def lines(k: str) -> tuple[str, ...]:
        v = table.get(k, [])
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{where}: {k} must be a string or a list of strings, got {v!r}")
        return tuple(v)

    if "partition" in table and "queue" in table:
        raise ConfigError(f"{where}: set partition or queue (synonyms), not both")
    cores = count("cores", 1) or 1
    processes = count("processes", 1) or cores
    if cores % processes:
        raise ConfigError(
            f"{where}: processes ({processes}) must divide cores ({cores}): "
            "each worker process gets cores / processes threads"
        )
    memory = text("memory") or "2GB"
    if "memory" in table:  # dask is imported only to check a given size (not on every load)
        try:
            from dask.utils import parse_bytes

            if parse_bytes(memory) < 2**20:
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"{where}: memory must be a size such as '4GB', got {memory!r}"
            ) from None
    walltime = text("walltime") or "01:00:00"
    if not _WALLTIME.match(walltime):
        raise ConfigError(
            f"{where}: walltime must be [D-]HH:MM:SS, MM:SS or minutes, got {walltime!r}"
        )
    jobs, lo, hi = count("jobs", 1), count("adaptive_min", 0), count("adaptive_max", 1)
    if jobs is not None and (lo is not None or hi is not None):
        raise ConfigError(f"{where}: set jobs (a fixed number) or adaptive_min/adaptive_max")
    if lo is not None and hi is None:
        raise ConfigError(f"{where}: adaptive_min needs adaptive_max")
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"{where}: adaptive_min ({lo}) > adaptive_max ({hi})")
    extra = tuple(re.sub(r"^#SBATCH\s+", "", x.strip()) for x in lines("job_extra"))
    for x in extra:
        if not x.startswith("-"):
            raise ConfigError(f"{where}: job_extra {x!r} is not an sbatch option (--name=value)")
    base = Path(root) if root is not None else Path.cwd()
    log_dir = text("log_directory") or ".flow/slurm"
    return ClusterConfig(
        partition=text("partition") or text("queue"),
        account=text("account"),
        cores=cores,
        processes=processes,
        memory=memory,
        walltime=walltime,
        jobs=jobs or 1,
        adaptive_min=(lo or 0) if hi is not None else None,
        adaptive_max=hi,
        job_extra=extra,
        prologue=lines("prologue"),
        python=text("python"),
        local_directory=text("local_directory"),
        log_directory=str(base / os.path.expanduser(log_dir)),
        interface=text("interface"),
        death_timeout=secs("death_timeout", 60.0),
        start_timeout=secs("start_timeout", 300.0),
        dashboard_address=text("dashboard_address") or ":8787",
        job_name=text("job_name") or "flow-worker",
    )


# --------------------------------------------------------------------------
# Dask workers as Slurm jobs


def make_cluster(config: ClusterConfig, kind: str = "slurm") -> Any:
    """A cluster of the configured shape with no jobs yet: a dask-jobqueue
    ``SLURMCluster`` (``kind="slurm"``) or a ``LocalCluster`` (``"local"``,
    started at its size)."""
    import logging

    from dask.utils import parse_bytes

    if kind == "local":
        from distributed import LocalCluster

        n = config.max_jobs * config.processes
        return LocalCluster(
            n_workers=n if not config.adaptive else (config.adaptive_min or 0) * config.processes,
            threads_per_worker=config.threads,
            processes=True,
            memory_limit=parse_bytes(config.memory) // config.processes,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        )
    if kind != "slurm":
        raise ConfigError(f"unknown cluster kind {kind!r}: use {' or '.join(CLUSTER_TYPES)}")
    cluster_class = slurm_cluster_class()
    if shutil.which("sbatch") is None:
        raise ConfigError("--cluster slurm: no sbatch on PATH (run it on a Slurm login node)")
    os.makedirs(config.log_directory, exist_ok=True)
    return cluster_class(
        queue=config.partition,
        account=config.account,
        cores=config.cores,
        processes=config.processes,
        memory=config.memory,
        walltime=config.walltime,
        job_name=config.job_name,
        job_extra_directives=list(config.job_extra),
        job_script_prologue=list(config.prologue),
        python=config.python or sys.executable,
        local_directory=config.local_directory,
        log_directory=config.log_directory,
        interface=config.interface,
        death_timeout=config.death_timeout,
        scheduler_options={"dashboard_address": config.dashboard_address},
        silence_logs="error",
    )


def slurm_cluster_class() -> type:
    """dask-jobqueue's ``SLURMCluster``, imported leaving SIGINT's handler as it was."""
    # dask-jobqueue 0.9.0 sets SIGINT's handler to sys.exit() when imported
    # (dask/dask-jobqueue#696): Ctrl-C would end a build with status 0.  Keep ours.
    sigint = signal.getsignal(signal.SIGINT)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError(
            "--cluster slurm needs dask-jobqueue: pip install 'flow-cbir[cluster]'"
        ) from None
    finally:
        if sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
    return SLURMCluster


def check_job_script(script: str) -> None:
    """Ask Slurm whether it would run ``script`` (``sbatch --test-only``); a
    :class:`ConfigError` with Slurm's reason if not (a bad partition, too many
    cores or too much memory for any node, ...)."""
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
        f.write(script)
    try:
        out = slurm_command(["sbatch", "--test-only", f.name], check=False)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        why = " ".join((out.stderr or out.stdout).split())
        raise ConfigError(f"[cluster]: Slurm would not run the job: {why}")


def slurm_command(
    args: list[str], check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run a Slurm command (``sbatch``, ``squeue``...); its output."""
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ConfigError(f"{args[0]} not found: is this a Slurm login node?") from None
    except subprocess.TimeoutExpired:
        raise FlowError(f"{args[0]} did not answer in {timeout:.0f} s") from None
    if check and out.returncode != 0:
        raise FlowError(f"{shlex.join(args)} failed: {' '.join(out.stderr.split())}")
    return out


class ClusterExecutor(DaskExecutor):
    """A :class:`~engine.builder.DaskExecutor` that owns its cluster: it starts
    the jobs (fixed or adaptive), waits for a first worker, sizes batches for
    the planned workers, and cancels every job on :meth:`close`."""

    def __init__(
        self,
        cluster: Any,
        config: ClusterConfig,
        *,
        kind: str = "slurm",
        retries: int = 2,
        log: Callable[[str], None] | None = None,
    ):
        self.kind, self.config = kind, config
        self._owned = cluster
        self._log = log or (lambda msg: None)
        self._sigterm: Any = None
        self._started = kind != "slurm"  # a worker has connected
        self._since: float | None = None
        self._told = False
        if threading.current_thread() is threading.main_thread():
            # a SIGTERM (kill, scancel of a surrounding job) stops the build as
            # Ctrl-C does, so that close() still cancels the worker jobs
            self._sigterm = signal.signal(signal.SIGTERM, _interrupt)
        try:
            super().__init__(cluster=cluster, retries=retries)
            self.name = f"{kind} cluster ({config.describe()})"
            if kind == "slurm":
                self._start_jobs()
            elif config.adaptive:
                cluster.adapt(
                    minimum=(config.adaptive_min or 0) * config.processes,
                    maximum=config.max_jobs * config.processes,
                )
            if self.dashboard:
                self._log(f"dashboard: {self.dashboard}")
            if kind == "slurm" and not (config.adaptive and not config.adaptive_min):
                self._wait_for_first_worker()
        except BaseException:
            self.close()
            raise

    def _start_jobs(self) -> None:
        c = self.config
        if c.adaptive:
            self._owned.adapt(minimum_jobs=c.adaptive_min or 0, maximum_jobs=c.max_jobs)
            self._log(f"slurm: adaptive, {c.describe()}")
        else:
            self._owned.scale(jobs=c.jobs)
            self._log(f"slurm: submitting {c.describe()}")

    @property
    def n_workers(self) -> int:  # type: ignore[override]
        """Threads planned (``max jobs x cores``): batches and waves are sized
        for the whole cluster, also while jobs wait in the queue -- and an
        adaptive cluster sees enough queued work to grow to its maximum."""
        return max(super().n_workers, self.config.max_jobs * self.config.cores)

    def job_ids(self) -> list[str]:
        """Slurm ids of the jobs submitted so far (running or not)."""
        jobs = getattr(self._owned, "workers", {}) or {}
        return [j.job_id for j in list(jobs.values()) if getattr(j, "job_id", None)]

    def _wait_for_first_worker(self) -> None:
        start = time.monotonic()
        while True:
            try:
                self.client.wait_for_workers(1, timeout=2)
            except TimeoutError:
                self._check_starting(time.monotonic() - start)
                continue
            self._started = True
            self._log(f"slurm: first worker after {time.monotonic() - start:.1f} s")
            return

    def wait_any(self, futures: set, timeout: float | None = None) -> tuple[set, set]:
        """As for any Dask cluster -- but until a first worker connects (an
        adaptive cluster starts none before there is work), fail rather than
        wait forever when the jobs cannot start."""
        if self._started:
            return super().wait_any(futures, timeout)
        self._since = self._since or time.monotonic()
        while True:
            step = 2.0 if timeout is None else min(timeout, 2.0)
            done, pending = super().wait_any(futures, step)
            if done or self.client.scheduler_info(n_workers=-1)["workers"]:
                self._started = True
                return (done, pending) if done or timeout is not None else self.wait_any(futures)
            self._check_starting(time.monotonic() - self._since)
            if timeout is not None:
                return done, pending

    def _check_starting(self, waited: float) -> None:
        """Raise when the worker jobs cannot start: all ended, or too slow."""
        timeout = self.config.start_timeout or math.inf
        ids = self.job_ids()
        states = job_states(ids) if ids else {}
        said = (
            ", ".join(f"job {i} {s[0]}" + (f" ({s[1]})" if s[1] else "") for i, s in states.items())
            or "no job submitted yet"
        )
        if ids and all(s[0] not in LIVE_STATES for s in states.values()):
            raise FlowError(
                f"every Slurm worker job ended before its worker connected: {said}"
                + _log_tails(self.config, ids)
            )
        if waited > timeout:
            raise FlowError(
                f"no Slurm worker connected within start_timeout = {timeout:.0f} s: {said}"
            )
        if waited > 10 and not self._told:
            self._log(f"slurm: waiting for worker jobs to start: {said}")
            self._told = True

    def close(self) -> None:
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None
        ids = self.job_ids() if self.kind == "slurm" else []
        try:
            if hasattr(self, "client"):
                super().close()
        finally:
            self._owned.close()
        if ids:
            left = _wait_gone(ids, 30.0)
            more = f" ({len(left)} still completing: {', '.join(left)})" if left else ""
            self._log(f"slurm: released {len(ids)} job(s){more}")


def _wait_gone(ids: list[str], timeout: float) -> list[str]:
    """Wait until Slurm has cleaned up cancelled jobs; the ids still there."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            live = [i for i, s in job_states(ids).items() if s[0] in LIVE_STATES]
        except FlowError:
            return []
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.5)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM does what Ctrl-C does: whatever SIGINT's handler is now (a
    build's graceful stop, or a KeyboardInterrupt)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def cluster_executor(
    project_or_config: Any,
    kind: str = "slurm",
    *,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
) -> ClusterExecutor:
    """The executor for ``flow build --cluster KIND``, from a project's
    ``[cluster]`` (or a :class:`ClusterConfig`).  ``workers`` sets a fixed
    number of jobs.  Close it (or use it in ``with``) to release the jobs."""
    config = project_or_config
    if not isinstance(config, ClusterConfig):
        project = project_or_config
        config = cluster_config(
            project.cluster, f"{project.file or 'flow.toml'}: [cluster]", root=project.root
        )
    if workers:
        config = replace(config, jobs=workers, adaptive_min=None, adaptive_max=None)
    cluster = make_cluster(config, kind)
    try:
        if kind == "slurm":
            check_job_script(cluster.job_script())
    except BaseException:
        cluster.close()
        raise
    return ClusterExecutor(cluster, config, kind=kind, log=log)


# --------------------------------------------------------------------------
# Slurm job states

# a job in these states may still run
_LIVE = "PENDING CONFIGURING RUNNING COMPLETING SUSPENDED REQUEUED RESIZING SIGNALING STAGE_OUT"
LIVE_STATES = frozenset((*_LIVE.split(), "REQUEUE_HOLD", "REQUEUE_FED"))


def job_states(ids: list[str]) -> dict[str, tuple[str, str]]:
    """Job id -> (state, reason) from ``squeue`` (``GONE`` once Slurm forgot it)."""
    out = slurm_command(
        ["squeue", "-h", "--states=all", "-j", ",".join(ids), "-o", "%i|%T|%r"], check=False
    )
    got = {}
    for line in out.stdout.splitlines():
        i, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        got[i] = (state, reason)
    return {i: got.get(i, ("GONE", "")) for i in ids}


def _log_tails(config: ClusterConfig, ids: list[str], n: int = 800) -> str:
    out = []
    for i in ids[:2]:
        for p in sorted(Path(config.log_directory).glob(f"*-{i}.err")):
            text = p.read_text(errors="replace").strip()
            if text:
                out.append(f"\n--- {p} (end) ---\n{text[-n:]}")
    return "".join(out)
