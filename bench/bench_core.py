"""Framework benchmarks (issue: core).  Run: ``python bench/bench_core.py [--quick]``.

On a synthetic catalog of small files and the generic chain of
:mod:`engine.testing` (3 per-item nodes + 1 set node):

* **no-op**: plan + check with nothing stale (scan, stat cache, catalogs,
  plan), at 10k and 100k items; median of several runs.
* **footprint**: store files per 10,000 items per node.
* **overhead**: a full build (sync executor, one process) against a
  hand-written loop doing the same computation and writing the same arrays
  with zarr in the same packing, measured in the same run; ratio.
* **scaling**: a CPU-bound build on a local Dask cluster of 2 workers against
  1 worker (cluster start excluded); ratio.  Both clusters are started first
  and the runs alternate (1, 2, 1, 2 ...), so load drifts over both alike.
  Beside it, in the same alternation, the **machine's own ceiling**: the same
  node calls over the same files in 1 and in 2 plain processes
  (``multiprocessing``, no flow, no store), so that a speed-up below 2x can be
  told apart: what the shared machine gives two processes, and what flow costs
  on top.

The overhead's timings exclude removing the previous run's output (both sides).

Prints a table; ``--json`` writes the numbers too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from engine import testing as ft
from engine.builder import build
from engine.executors import get_executor
from store import open_store


def _median(fn, runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def noop(tmp: Path, n: int, runs: int) -> dict:
    data, st_path = tmp / f"data{n}", tmp / f"store{n}"
    ft.write_synthetic_files(data, n, size=64)
    store = open_store(st_path)
    items, sources = ft.synthetic_inputs(data, store)
    t0 = time.perf_counter()
    rep = build(ft.synthetic_graph(), items, sources, store, progress=False)
    first = time.perf_counter() - t0
    assert rep.ok, rep.failures[:3]
    time.sleep(2.1)  # let every file age past the stat cache's "too recent" window
    ft.synthetic_inputs(data, store)  # the cache now trusts every file

    from flow.plan import plan
    from store.catalog import load_catalog
    from store.objects import load_objects

    g = ft.synthetic_graph()

    def check() -> None:
        s = open_store(st_path)
        it, _ = ft.synthetic_inputs(data, s)
        cats = {n: load_catalog(s, n) for n in ("parsed", "smoothed", "histogram")}
        objs = {"mean_histogram": load_objects(s, "mean_histogram")}
        p = plan(g, it, cats, objs, reasons=False)
        assert p.done and all(sp.count(0) == len(sp.status) for sp in p.steps.values()), "stale"

    med, times = _median(check, runs)
    files = sum(1 for _ in store.walk("packs/parsed"))
    return {
        "items": n,
        "first_build_s": round(first, 2),
        "noop_median_s": round(med, 4),
        "noop_runs_s": [round(t, 4) for t in times],
        "files_per_10k_items_per_node": round(files / n * 10_000, 1),
    }


def _hand_loop(data: Path, out: Path, pack: int) -> None:
    """The same computation and arrays, written without the framework."""
    import zarr
    from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

    files = sorted(data.glob("*.bin"))
    zs = zarr.storage.LocalStore(out)
    hists = []

    def write(name: str, arr: np.ndarray) -> None:
        zarr.create_array(
            zs,
            name=name,
            data=arr,
            serializer=BytesCodec(),
            compressors=[ZstdCodec(level=1), Crc32cCodec()],
        )

    k = ft.smoothed.params()
    for lo in range(0, len(files), pack):
        a, b, c = [], [], []
        for f in files[lo : lo + pack]:
            x = ft.parsed.fn(f.read_bytes(), scale=1.0)
            y = ft.smoothed.fn(x, width=k.width, work=k.work)
            h = ft.histogram.fn(y, bins=16)
            a.append(x)
            b.append(y)
            c.append(h["hist"])
        write(f"parsed/{lo}", np.stack(a))
        write(f"smoothed/{lo}", np.stack(b))
        write(f"histogram/{lo}", np.stack(c))
        hists.extend(c)
    write("mean", np.mean(np.stack(hists), axis=0))


def overhead(tmp: Path, n: int, runs: int) -> dict:
    data = tmp / f"ovh{n}"
    ft.write_synthetic_files(data, n, size=4096)
    pack = 1000

    st, out = tmp / "ovh_store", tmp / "ovh_hand"

    def flow_build() -> None:
        store = open_store(st)
        items, sources = ft.synthetic_inputs(data, None)
        rep = build(ft.synthetic_graph(), items, sources, store, progress=False, batch_size=pack)
        assert rep.ok

    def hand() -> None:
        _hand_loop(data, out, pack)

    def cpu(fn) -> tuple[float, float]:
        """Wall and CPU seconds (all of this process's threads) of ``fn()``."""
        w, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w, time.process_time() - c

    flow_times, hand_times = [], []
    for _ in range(runs):  # interleaved, so drift hits both alike
        shutil.rmtree(st, ignore_errors=True)
        flow_times.append(cpu(flow_build))
        shutil.rmtree(out, ignore_errors=True)
        hand_times.append(cpu(hand))
    f, h = (statistics.median(t[0] for t in x) for x in (flow_times, hand_times))
    fc, hc = (statistics.median(t[1] for t in x) for x in (flow_times, hand_times))
    return {
        "items": n,
        "flow_s": round(f, 3),
        "hand_loop_s": round(h, 3),
        "ratio": round(f / h, 3),
        "flow_runs_s": [round(t[0], 3) for t in flow_times],
        "hand_runs_s": [round(t[0], 3) for t in hand_times],
        # CPU time moves less than wall time when other jobs share the cores
        "flow_cpu_s": round(fc, 3),
        "hand_loop_cpu_s": round(hc, 3),
        "cpu_ratio": round(fc / hc, 3),
    }


def _raw_work(args: tuple[list[str], int]) -> int:
    """The node calls of one share of the files, as plain Python (the ceiling)."""
    paths, work = args
    k = ft.smoothed.params()
    for f in paths:
        x = ft.parsed.fn(Path(f).read_bytes(), scale=1.0)
        y = ft.smoothed.fn(x, width=k.width, work=work)
        ft.histogram.fn(y, bins=16)
    return len(paths)


def _raw(pool, files: list[str], work: int, procs: int) -> float:
    shares = [(files[i::procs], work) for i in range(procs)]
    t0 = time.perf_counter()
    assert sum(pool.map(_raw_work, shares)) == len(files)
    return time.perf_counter() - t0


def scaling(tmp: Path, n: int, work: int, runs: int) -> dict:
    import multiprocessing as mp

    data = tmp / f"scale{n}"
    ft.write_synthetic_files(data, n, size=4096)
    files = [str(p) for p in sorted(data.glob("*.bin"))]
    params = {"smoothed": {"work": work}}
    exs = {w: get_executor("local", w) for w in (1, 2)}
    ctx = mp.get_context("spawn")
    pools = {w: ctx.Pool(w) for w in (1, 2)}
    times: dict[int, list[float]] = {1: [], 2: []}
    raw: dict[int, list[float]] = {1: [], 2: []}
    load = [os.getloadavg()]
    try:
        for w in (1, 2):  # warm: imports in the workers, the pools' processes
            _raw(pools[w], files[: 4 * w], work, w)
        for r in range(runs + 1):  # the first round warms the workers, not counted
            for w in (1, 2) if r % 2 == 0 else (2, 1):
                st = tmp / f"scale_store_{w}_{r}"
                store = open_store(st)
                items, sources = ft.synthetic_inputs(data, None)
                t0 = time.perf_counter()
                rep = build(
                    ft.synthetic_graph(params), items, sources, store, exs[w], progress=False
                )
                dt = time.perf_counter() - t0
                assert rep.ok
                shutil.rmtree(st, ignore_errors=True)
                raw_dt = _raw(pools[w], files, work, w)
                if r:
                    times[w].append(dt)
                    raw[w].append(raw_dt)
        load.append(os.getloadavg())
    finally:
        for ex in exs.values():
            ex.close()
        for pool in pools.values():
            pool.terminate()
    one, two = statistics.median(times[1]), statistics.median(times[2])
    raw1, raw2 = statistics.median(raw[1]), statistics.median(raw[2])
    return {
        "items": n,
        "work": work,
        "one_worker_s": round(one, 3),
        "two_workers_s": round(two, 3),
        "speedup": round(one / two, 3),
        "runs_s": {str(w): [round(t, 3) for t in v] for w, v in times.items()},
        "raw_one_s": round(raw1, 3),
        "raw_two_s": round(raw2, 3),
        "raw_speedup": round(raw1 / raw2, 3),
        "raw_runs_s": {str(w): [round(t, 3) for t in v] for w, v in raw.items()},
        "loadavg_before_after": load,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10k no-op only, fewer runs")
    ap.add_argument(
        "--only",
        choices=["noop", "overhead", "scaling"],
        action="append",
        help="run only these parts (repeatable)",
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="flow-bench-"))
    results: dict = {}
    try:
        only = set(args.only or ["noop", "overhead", "scaling"])
        sizes = (10_000,) if args.quick else (10_000, 100_000)
        results["noop"] = [noop(tmp, n, args.runs) for n in sizes] if "noop" in only else []
        for r in results["noop"]:
            print(
                f"no-op {r['items']:>7} items: median {r['noop_median_s']:.3f} s "
                f"{r['noop_runs_s']}; {r['files_per_10k_items_per_node']} files/10k/node "
                f"(first build {r['first_build_s']} s)",
                flush=True,
            )
        if "overhead" in only:
            results["overhead"] = o = overhead(tmp, 2000 if args.quick else 10_000, args.runs)
            print(
                f"overhead {o['items']} items: flow {o['flow_s']} s, hand loop "
                f"{o['hand_loop_s']} s, ratio {o['ratio']} (flow {o['flow_runs_s']}, hand "
                f"{o['hand_runs_s']}); CPU time {o['flow_cpu_s']} s / {o['hand_loop_cpu_s']} s"
                f" = {o['cpu_ratio']}; load {os.getloadavg()}",
                flush=True,
            )
        if "scaling" in only:
            results["scaling"] = s = scaling(tmp, 400 if args.quick else 2000, 40, args.runs)
            print(
                f"scaling {s['items']} items (work={s['work']}): 1 worker {s['one_worker_s']} s, "
                f"2 workers {s['two_workers_s']} s, speedup {s['speedup']} {s['runs_s']}; the "
                f"machine's ceiling (same calls, plain processes): {s['raw_one_s']} s / "
                f"{s['raw_two_s']} s = {s['raw_speedup']} {s['raw_runs_s']}; load "
                f"{s['loadavg_before_after']}",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    os._exit(0)  # don't wait for distributed's atexit chatter


if __name__ == "__main__":
    main()
