"""Slurm benchmarks (issue 5).  Run: ``python bench/bench_slurm.py [--runs 5] [--json F]``.

Starts a private single-node Slurm (munged + slurmctld + slurmd, see
``tests/slurm/conftest.py``; needs root and ``slurm-wlm``) unless
``--external`` says to use the Slurm that ``sbatch`` already talks to, and
measures, on the synthetic pipeline of :mod:`engine.testing`:

* **throughput**: items/s of a CPU-bound build (``smoothed`` with ``work``)
  on 1, 2 and 4 single-threaded Dask workers, started three ways: as
  single-core Slurm jobs through dask-jobqueue (``engine.cluster``); as the
  same worker command run directly, each in its own session (as slurmstepd
  runs a job); and as flow's default ``local`` executor (a ``LocalCluster``,
  whose workers share this process's session).  A fresh store per run,
  cluster start excluded, median (and best) of ``--runs``; the three kinds
  are up together and their runs alternate, so that the machine's other load
  drifts over all alike.  The private Slurm runs the jobs in its ``shared``
  partition (up to 4 jobs per CPU), so 4 workers fit on a 2-core machine.
  On a machine other sessions load, Linux's autogroup scheduler shares the
  CPU per session: one-session-per-worker kinds (Slurm jobs, worker
  processes) then get more of it than a LocalCluster does.
* **start**: seconds from submitting the worker jobs to all workers connected.
* **overhead**: per task, for near-empty tasks: a no-op function through the
  executor (flow's waves: ``2 x workers + 1`` in flight), and a build of
  tiny items in batches of one item (each task runs the 3-node chain and
  writes its pack), with 2 workers of each kind.

Prints a table on stdout (logs go to stderr); ``--json`` writes the numbers too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.builder import build  # noqa: E402
from engine.cluster import cluster_config, cluster_executor  # noqa: E402
from engine.executors import DaskExecutor, get_executor  # noqa: E402
from engine.testing import synthetic_graph, synthetic_inputs, write_synthetic_files  # noqa: E402
from store import open_store  # noqa: E402


def _local_slurm():
    """tests/slurm/conftest.py's LocalSlurm (loaded by path: tests is no package)."""
    spec = importlib.util.spec_from_file_location(
        "flow_slurm_conftest", ROOT / "tests" / "cluster" / "conftest.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LAUNCHES = ("slurm", "procs", "local")


def _noop() -> None:
    return None


class _Processes(DaskExecutor):
    """A scheduler here and ``workers`` worker processes started directly, each
    in its own session -- the worker command dask-jobqueue puts in a job."""

    def __init__(self, workers: int):
        from distributed import LocalCluster

        self._sched = LocalCluster(n_workers=0, dashboard_address=":0", silence_logs=40)
        args = [
            sys.executable,
            "-m",
            "distributed.cli.dask_worker",
            self._sched.scheduler_address,
            "--nthreads",
            "1",
            "--memory-limit",
            "1GB",
            "--nanny",
            "--death-timeout",
            "60",
        ]
        self._procs = [
            subprocess.Popen(
                args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            for _ in range(workers)
        ]
        super().__init__(cluster=self._sched)
        self.name = f"{workers} worker processes"

    def close(self) -> None:
        try:
            super().close()
            self._sched.close()
        finally:
            for p in self._procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)


def _executor(kind: str, workers: int, tmp: Path, partition: str | None):
    """(executor, seconds until every worker connected)."""
    t0 = time.perf_counter()
    if kind == "local":
        ex = get_executor("local", workers)
    elif kind == "procs":
        ex = _Processes(workers)
    else:
        table = {"cores": 1, "memory": "1GB", "walltime": "00:30:00", "jobs": workers}
        # jobs run as niced as this process, like the other workers
        table["prologue"] = [f"renice -n {os.nice(0)} -p $$ >/dev/null"]
        table["dashboard_address"] = ":0"
        if partition:
            table["partition"] = partition
        cfg = cluster_config(table, root=tmp)
        ex = cluster_executor(cfg, "slurm")
    ex.client.wait_for_workers(workers, timeout=300)
    return ex, time.perf_counter() - t0


def _build_time(ex, data: Path, store: Path, params: dict, **kw) -> tuple[float, int]:
    shutil.rmtree(store, ignore_errors=True)
    st = open_store(store)
    items, sources = synthetic_inputs(data, None)
    t0 = time.perf_counter()
    rep = build(synthetic_graph(params), items, sources, st, ex, progress=False, **kw)
    dt = time.perf_counter() - t0
    assert rep.ok, rep.failures
    return dt, sum(s.tasks for s in rep.steps.values())


def _noop_per_task(ex, n: int) -> float:
    """Seconds per no-op task with flow's wave width in flight."""
    width = 2 * ex.n_workers + 1
    t0 = time.perf_counter()
    pending: set = set()
    sent = 0
    while sent < n or pending:
        while sent < n and len(pending) < width:
            pending.add(ex.submit(_noop))
            sent += 1
        done, pending = ex.wait_any(pending)
        for f in done:
            ex.result(f)
    return (time.perf_counter() - t0) / n


def run(args, tmp: Path, partition: str | None) -> dict:
    data = tmp / "cpu"
    write_synthetic_files(data, args.items)
    tiny = tmp / "tiny"
    write_synthetic_files(tiny, args.tiny, size=64)
    params = {"smoothed": {"work": args.work}}
    out: dict = {
        "items": args.items,
        "work": args.work,
        "runs": args.runs,
        "throughput": {},
        "start_s": {},
        "overhead": {},
    }
    kinds = LAUNCHES
    for workers in (1, 2, 4):
        # both clusters up at once, their runs alternating: the machine's other
        # load drifts, and this way it hits both alike
        exs: dict = {}
        try:
            for kind in kinds:
                exs[kind] = _executor(kind, workers, tmp, partition)
            times: dict = {k: [] for k in kinds}
            noop: dict = {k: [] for k in kinds}
            per: dict = {k: [] for k in kinds}
            for _ in range(args.runs):
                for kind in kinds:
                    ex = exs[kind][0]
                    times[kind].append(_build_time(ex, data, tmp / "store", params)[0])
                    if workers == 2:
                        noop[kind].append(_noop_per_task(ex, args.noop))
                        dt, tasks = _build_time(ex, tiny, tmp / "store", {}, batch_size=1)
                        per[kind].append(dt / tasks)
        finally:
            for ex, _ in exs.values():
                ex.close()
        for kind in kinds:
            ts, med = times[kind], statistics.median(times[kind])
            out["throughput"].setdefault(kind, {})[workers] = {
                "median_s": round(med, 3),
                "items_per_s": round(args.items / med, 1),
                "best_items_per_s": round(args.items / min(ts), 1),
                "runs_s": [round(t, 3) for t in ts],
            }
            out["start_s"].setdefault(kind, {})[workers] = round(exs[kind][1], 2)
            if workers == 2:
                out["overhead"][kind] = {
                    "noop_ms": round(1000 * statistics.median(noop[kind]), 2),
                    "batch_of_one_ms": round(1000 * statistics.median(per[kind]), 2),
                }
            print(
                f"{kind:>5} x{workers}: {args.items / med:8.1f} items/s (median {med:.3f} s of "
                f"{[round(t, 2) for t in ts]}); workers up in {exs[kind][1]:.1f} s",
                flush=True,
            )
    return out


def table(out: dict) -> str:
    t, start = out["throughput"], out["start_s"]
    rows = [
        "| workers | Slurm jobs | worker processes | LocalCluster | Slurm vs 1 | jobs up (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for w in (1, 2, 4):
        cells = [f"{t[k][w]['items_per_s']} ({t[k][w]['best_items_per_s']})" for k in LAUNCHES]
        rows.append(
            f"| {w} | {' | '.join(cells)} | "
            f"{t['slurm'][w]['items_per_s'] / t['slurm'][1]['items_per_s']:.2f}x | "
            f"{start['slurm'][w]} |"
        )
    o = out["overhead"]
    rows += [
        "",
        "| per task, 2 workers (median) | Slurm jobs (ms) | worker processes (ms) | "
        "LocalCluster (ms) |",
        "|---|---:|---:|---:|",
        "| no-op function | " + " | ".join(str(o[k]["noop_ms"]) for k in LAUNCHES) + " |",
        "| batch of 1 tiny item (3-node chain + pack write) | "
        + " | ".join(str(o[k]["batch_of_one_ms"]) for k in LAUNCHES)
        + " |",
    ]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--items", type=int, default=400, help="CPU-bound build size")
    ap.add_argument("--work", type=int, default=2000, help="smoothed's work per item")
    ap.add_argument("--tiny", type=int, default=200, help="items of the batch-of-one build")
    ap.add_argument("--noop", type=int, default=500, help="no-op tasks per run")
    ap.add_argument(
        "--external",
        action="store_true",
        help="use the running Slurm (SLURM_CONF / default) instead of a private one",
    )
    ap.add_argument("--partition", help="with --external: the partition of the worker jobs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.getLogger("distributed").setLevel(logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="flow-bench-slurm-"))
    slurm = None
    try:
        if not args.external:
            mod = _local_slurm()
            why = mod.unavailable()
            if why:
                sys.exit(f"cannot start a private Slurm: {why}")
            slurm = mod.LocalSlurm(tmp / "slurm").start()
            os.environ["SLURM_CONF"] = str(slurm.conf)
            print(f"private Slurm: 1 node, {slurm.cpus} CPUs, {slurm.memory_mb} MiB", flush=True)
        partition = args.partition if args.external else "shared"
        out_load = round(os.getloadavg()[0], 2)
        print(f"load average before: {out_load}; {os.cpu_count()} CPUs", flush=True)
        out = run(args, tmp, partition)
        out["cpus"] = os.cpu_count()
        out["load_before"], out["load_after"] = out_load, round(os.getloadavg()[0], 2)
        print(f"load average after: {out['load_after']}")
        print()
        print(table(out))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    finally:
        if slurm is not None:
            slurm.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
