"""No-op planning at archive scale.  Run: ``python bench/bench_scale.py [--million]``.

* 100k real files: the generic 3+1 node chain of :mod:`engine.testing` built
  once, then "plan + check" with nothing stale (scan, stat cache, catalogs,
  plan), median of several runs.  The first run comes right after the build,
  as a user's next ``flow build`` would; it is also printed on its own.
* 1M simulated items (``--million``): keys only -- no files.  A synthetic
  store holds pack manifests for 1M items x 3 item nodes (written directly,
  without arrays), and the timed part is what a no-op build does after the
  scan: load the three catalogs (cache + listing reconciliation) and plan the
  graph over 1M items.  The plan that follows the catalog build stands for
  the end of the build that wrote the packs (it leaves the planner's
  recipe-key cache, as a real build does); it is reported apart.
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
from flow.keys import KEY_SIZE, item_key
from flow.plan import ItemTable, plan
from store import open_store
from store.catalog import load_catalog
from store.objects import load_objects

NODES = ("parsed", "smoothed", "histogram")


def noop_files(tmp: Path, n: int, runs: int) -> dict:
    data, st = tmp / "data", tmp / "store"
    t0 = time.perf_counter()
    ft.write_synthetic_files(data, n, size=32)
    made = time.perf_counter() - t0
    store = open_store(st)
    items, sources = ft.synthetic_inputs(data, store)
    t0 = time.perf_counter()
    rep = build(ft.synthetic_graph(), items, sources, store, progress=False)
    first = time.perf_counter() - t0
    assert rep.ok
    time.sleep(2.1)  # files older than the stat cache's "too recent" window
    ft.synthetic_inputs(data, store)
    g = ft.synthetic_graph()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s = open_store(st)
        it, _ = ft.synthetic_inputs(data, s)
        cats = {n: load_catalog(s, n) for n in NODES}
        p = plan(g, it, cats, {"mean_histogram": load_objects(s, "mean_histogram")}, reasons=False)
        times.append(time.perf_counter() - t0)
        assert p.done and all(sp.counts()["fresh"] == len(sp.status) for sp in p.steps.values())
    return {
        "items": n,
        "make_files_s": round(made, 1),
        "first_build_s": round(first, 1),
        "noop_median_s": round(statistics.median(times), 3),
        "noop_runs_s": [round(t, 3) for t in times],
    }


def noop_million(tmp: Path, n: int, runs: int, per_pack: int = 1000) -> dict:
    """A synthetic store catalog of n items x 3 nodes (manifests only), then plan."""
    st = open_store(tmp / "mstore")
    g = ft.synthetic_graph()
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (n, KEY_SIZE), dtype=np.uint8)
    ids = [f"f{i:07d}" for i in range(n)]
    src_keys = [src[i].tobytes() for i in range(n)]
    t0 = time.perf_counter()
    upstream = src_keys
    for name in NODES:
        prefix = bytes(g[name].prefix)
        rks = [bytes(item_key(prefix, [k])) for k in upstream]
        cks = [bytes(item_key(b"content", [r])) for r in rks]  # any distinct content keys
        for lo in range(0, n, per_pack):
            hi = min(n, lo + per_pack)
            doc = {
                "format": "flow/1",
                "kind": "pack",
                "id": f"p{lo:08d}",
                "node": name,
                "step": name,
                "version": 1,
                "fingerprint": g[name].node.fingerprint,
                "params": {},
                "prefix": prefix.hex(),
                "created": float(lo),
                "n": hi - lo,
                "ids": ids[lo:hi],
                "rkeys": b"".join(rks[lo:hi]).hex(),
                "ckeys": b"".join(cks[lo:hi]).hex(),
                "inputs": [k.hex() for k in upstream[lo:hi]],
                "seconds": [0.0] * (hi - lo),
                "fields": {},
                "attrs": {},
                "failures": [],
            }
            st.put(f"packs/{name}/p{lo:08d}.json", json.dumps(doc).encode())
        upstream = cks
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name in NODES:
        load_catalog(st, name)  # first load builds the cache from the manifests
    cache_build = time.perf_counter() - t0
    items = ItemTable(ids, [""] * n, {"files": src_keys})
    # the plan at the end of the build that wrote these packs: it leaves the
    # planner's recipe-key cache (cache/recipes/) that a real no-op then finds
    t0 = time.perf_counter()
    cats = {name: load_catalog(st, name) for name in NODES}
    plan(g, items, cats, {"mean_histogram": load_objects(st, "mean_histogram")}, reasons=False)
    cold_plan = time.perf_counter() - t0
    times, plan_only = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        cats = {name: load_catalog(st, name) for name in NODES}
        t1 = time.perf_counter()
        p = plan(
            g, items, cats, {"mean_histogram": load_objects(st, "mean_histogram")}, reasons=False
        )
        t2 = time.perf_counter()
        times.append(t2 - t0)
        plan_only.append(t2 - t1)
        for name in NODES:
            assert p.steps[name].counts()["fresh"] == n, name
    return {
        "items": n,
        "write_manifests_s": round(made, 1),
        "first_catalog_build_s": round(cache_build, 1),
        "cold_noop_s": round(cold_plan, 2),
        "noop_median_s": round(statistics.median(times), 2),
        "plan_median_s": round(statistics.median(plan_only), 2),
        "noop_runs_s": [round(t, 2) for t in times],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--million", action="store_true", help="also the 1M-item simulation")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="flow-scale-"))
    try:
        r = noop_files(tmp, args.files, args.runs)
        print(
            f"no-op, {r['items']} files: median {r['noop_median_s']} s {r['noop_runs_s']} "
            f"(the first, right after the build: {r['noop_runs_s'][0]} s; first build "
            f"{r['first_build_s']} s)",
            flush=True,
        )
        if args.million:
            m = noop_million(tmp, 1_000_000, max(3, args.runs // 2))
            print(
                f"no-op, 1M simulated items x 3 nodes: median {m['noop_median_s']} s "
                f"(plan alone {m['plan_median_s']} s) {m['noop_runs_s']}; catalog cache "
                f"built once in {m['first_catalog_build_s']} s; without the recipe-key "
                f"cache {m['cold_noop_s']} s",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    main()
