"""No-op planning at archive scale.  Run: ``python bench/bench_scale.py [--million]``.

Both cases time, in this process, everything a no-op ``flow build`` does after
start-up: open the store, **scan the source folder** (``os.scandir`` + ``stat`` of
every file, the stat cache, hashing what it cannot vouch for), load the item
catalogs and the set outputs, and plan the graph.  No untimed scan comes before
the first timed no-op.  (The fresh-process figures -- interpreter, imports and
project load included -- are ``bench_cli.py``'s; these are the in-process part.)

* 100k real files: the generic 3+1 node chain of :mod:`engine.testing` built
  once (a real build), then the no-op ``--runs`` times.  The first comes right
  after the build, as a user's next ``flow build`` would (files written in the
  2 s before the build's scan are hashed again then: the stat cache does not
  vouch for a file that young); it is also printed on its own.
* 1M real files (``--million``): 1,000,000 tiny files (8 bytes each, 1,000 per
  folder) are written to disk, and one scan hashes them all into the store's
  stat cache: the scan of the build that would have computed them.  That
  build is **simulated at the store level**: a pack manifest per 1,000 items x
  3 item nodes is written directly (keys only, no arrays), with recipe keys
  derived from the files' real keys, exactly as the build would have derived
  them.  The catalogs' caches and the planner's recipe-key memo are then made
  as that build's end would make them (reported apart).  The timed no-op is
  the same as for 100k: scan of the 1M files on disk, stat cache, catalogs,
  plan.  ``--million-dir DIR`` keeps (and reuses) the files.
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

from engine import testing as ft
from engine.builder import build
from flow.keys import item_key
from flow.plan import plan
from store import open_store
from store.catalog import load_catalog, save_recipes
from store.objects import load_objects

NODES = ("parsed", "smoothed", "histogram")


def _noop(store_path: Path, data: Path, g) -> tuple[float, dict]:
    """One timed no-op: open, scan (stat cache), catalogs, set outputs, plan."""
    t0 = time.perf_counter()
    s = open_store(store_path)
    t_scan = time.perf_counter()
    it, _ = ft.synthetic_inputs(data, s)
    t_cat = time.perf_counter()
    cats = {n: load_catalog(s, n) for n in NODES}
    objs = {"mean_histogram": load_objects(s, "mean_histogram")}
    t_plan = time.perf_counter()
    p = plan(g, it, cats, objs, reasons=False)
    t1 = time.perf_counter()
    for name in NODES:
        assert p.steps[name].counts()["fresh"] == len(it.ids), name
    parts = {"scan_s": t_cat - t_scan, "catalogs_s": t_plan - t_cat, "plan_s": t1 - t_plan}
    return t1 - t0, parts


def _summary(times: list[float], parts: list[dict]) -> dict:
    return {
        "noop_median_s": round(statistics.median(times), 3),
        "noop_runs_s": [round(t, 3) for t in times],
        "first_noop_s": round(times[0], 3),
        "median_parts_s": {k: round(statistics.median(p[k] for p in parts), 3) for k in parts[0]},
        "parts_s": [{k: round(v, 3) for k, v in p.items()} for p in parts],
    }


def noop_files(tmp: Path, n: int, runs: int) -> dict:
    data, st = tmp / "data", tmp / "store"
    t0 = time.perf_counter()
    ft.write_synthetic_files(data, n, size=32)
    made = time.perf_counter() - t0
    store = open_store(st)
    t0 = time.perf_counter()
    items, sources = ft.synthetic_inputs(data, store)
    rep = build(ft.synthetic_graph(), items, sources, store, progress=False)
    first = time.perf_counter() - t0
    assert rep.ok
    g = ft.synthetic_graph()
    times, parts = [], []
    for _ in range(runs):  # the first right after the build: no warm-up scan
        dt, part = _noop(st, data, g)
        times.append(dt)
        parts.append(part)
    return {
        "items": n,
        "make_files_s": round(made, 1),
        "first_build_s": round(first, 1),
        **_summary(times, parts),
    }


def write_tiny_files(data: Path, n: int, per_folder: int = 1000) -> float:
    """n files of 8 bytes (their index), ``per_folder`` to a folder; seconds taken.
    Files already there (``--million-dir``) are kept."""
    t0 = time.perf_counter()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for lo in range(0, n, per_folder):
        folder = data / f"d{lo // per_folder:05d}"
        if (folder / f"f{min(n, lo + per_folder) - 1:07d}.bin").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(lo, min(n, lo + per_folder)):
            try:
                fd = os.open(folder / f"f{i:07d}.bin", flags, 0o644)
            except FileExistsError:
                continue
            os.write(fd, i.to_bytes(8, "little"))
            os.close(fd)
    return time.perf_counter() - t0


def noop_million(tmp: Path, n: int, runs: int, data: Path, per_pack: int = 1000) -> dict:
    """n real files; their build simulated by manifests (keys only); timed no-ops."""
    made = write_tiny_files(data, n)
    st_path = tmp / "mstore"
    st = open_store(st_path)
    g = ft.synthetic_graph()
    t0 = time.perf_counter()
    items, _ = ft.synthetic_inputs(data, st)  # the build's scan: hashes every file
    first_scan = time.perf_counter() - t0
    ids = items.ids
    assert len(ids) == n, len(ids)
    src_keys = [bytes(k) for k in items.sources["files"]]
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
    manifests = time.perf_counter() - t0
    # the end of the build that wrote these packs: its catalogs are saved as
    # caches, and its final plan leaves the planner's recipe-key memo
    t0 = time.perf_counter()
    cats = {name: load_catalog(st, name) for name in NODES}
    catalog_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = plan(g, items, cats, {"mean_histogram": load_objects(st, "mean_histogram")}, reasons=False)
    memo_plan = time.perf_counter() - t0
    save_recipes(st, cats, p)  # as the builder does after a plan
    del items, cats, src_keys, upstream
    times, parts = [], []
    for _ in range(runs):
        dt, part = _noop(st_path, data, g)
        times.append(dt)
        parts.append(part)
    return {
        "items": n,
        "files": "real: 8-byte files, 1000 per folder, on disk",
        "make_files_s": round(made, 1),
        "first_scan_hashing_all_s": round(first_scan, 1),
        "write_manifests_s": round(manifests, 1),
        "first_catalog_build_s": round(catalog_build, 1),
        "plan_without_memo_s": round(memo_plan, 2),
        **_summary(times, parts),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--million", action="store_true", help="also the 1M-file case")
    ap.add_argument("--million-dir", type=Path, help="keep the 1M files here (reused)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="flow-scale-"))
    out: dict = {"load_before": os.getloadavg()}
    try:
        if args.files:
            r = out["files"] = noop_files(tmp, args.files, args.runs)
            print(
                f"no-op, {r['items']} files: median {r['noop_median_s']} s {r['noop_runs_s']} "
                f"(the first, right after the build: {r['first_noop_s']} s; first build "
                f"{r['first_build_s']} s); median parts {r['median_parts_s']}",
                flush=True,
            )
        if args.million:
            data = args.million_dir or tmp / "million"
            m = out["million"] = noop_million(tmp, 1_000_000, max(3, args.runs // 2), data)
            print(
                f"no-op, 1M real files x 3 nodes (build simulated by manifests): median "
                f"{m['noop_median_s']} s {m['noop_runs_s']} (the first: {m['first_noop_s']} s); "
                f"median parts {m['median_parts_s']}; files made in {m['make_files_s']} s, "
                f"first scan hashing all {m['first_scan_hashing_all_s']} s, catalog caches "
                f"built in {m['first_catalog_build_s']} s, plan without the recipe-key memo "
                f"{m['plan_without_memo_s']} s",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["load_after"] = os.getloadavg()
    print(f"load average before/after: {out['load_before']} / {out['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    os._exit(0)


if __name__ == "__main__":
    main()
