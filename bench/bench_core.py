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
  1 worker (cluster start excluded); ratio.

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

    def flow_build() -> None:
        st = tmp / "ovh_store"
        shutil.rmtree(st, ignore_errors=True)
        store = open_store(st)
        items, sources = ft.synthetic_inputs(data, None)
        rep = build(ft.synthetic_graph(), items, sources, store, progress=False, batch_size=pack)
        assert rep.ok

    def hand() -> None:
        out = tmp / "ovh_hand"
        shutil.rmtree(out, ignore_errors=True)
        _hand_loop(data, out, pack)

    flow_times, hand_times = [], []
    for _ in range(runs):  # interleaved, so drift hits both alike
        flow_times.append(_median(flow_build, 1)[0])
        hand_times.append(_median(hand, 1)[0])
    f, h = statistics.median(flow_times), statistics.median(hand_times)
    return {"items": n, "flow_s": round(f, 3), "hand_loop_s": round(h, 3), "ratio": round(f / h, 3)}


def scaling(tmp: Path, n: int, work: int, runs: int) -> dict:
    data = tmp / f"scale{n}"
    ft.write_synthetic_files(data, n, size=4096)
    params = {"smoothed": {"work": work}}
    out = {}
    for workers in (1, 2):
        ex = get_executor("local", workers)
        try:
            times = []
            for r in range(runs):
                st = tmp / f"scale_store_{workers}_{r}"
                store = open_store(st)
                items, sources = ft.synthetic_inputs(data, None)
                t0 = time.perf_counter()
                rep = build(ft.synthetic_graph(params), items, sources, store, ex, progress=False)
                times.append(time.perf_counter() - t0)
                assert rep.ok
        finally:
            ex.close()
        out[workers] = statistics.median(times)
    return {
        "items": n,
        "work": work,
        "one_worker_s": round(out[1], 3),
        "two_workers_s": round(out[2], 3),
        "speedup": round(out[1] / out[2], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10k no-op only, fewer runs")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="flow-bench-"))
    results: dict = {}
    try:
        sizes = (10_000,) if args.quick else (10_000, 100_000)
        results["noop"] = [noop(tmp, n, args.runs) for n in sizes]
        for r in results["noop"]:
            print(
                f"no-op {r['items']:>7} items: median {r['noop_median_s']:.3f} s "
                f"{r['noop_runs_s']}; {r['files_per_10k_items_per_node']} files/10k/node "
                f"(first build {r['first_build_s']} s)",
                flush=True,
            )
        results["overhead"] = overhead(tmp, 2000 if args.quick else 10_000, 3)
        o = results["overhead"]
        print(
            f"overhead {o['items']} items: flow {o['flow_s']} s, hand loop {o['hand_loop_s']} s,"
            f" ratio {o['ratio']}",
            flush=True,
        )
        results["scaling"] = scaling(tmp, 400 if args.quick else 2000, 40, 3)
        s = results["scaling"]
        print(
            f"scaling {s['items']} items (work={s['work']}): 1 worker {s['one_worker_s']} s, "
            f"2 workers {s['two_workers_s']} s, speedup {s['speedup']}",
            flush=True,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    os._exit(0)  # don't wait for distributed's atexit chatter


if __name__ == "__main__":
    main()
