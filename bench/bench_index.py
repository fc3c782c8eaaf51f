"""Index benchmark: annoy (angular, Hamming + re-rank), exact search, hnswlib.

Synthetic unit vectors (a mixture of Gaussians, like embeddings of many
similar studies) with labels from the mixture component; queries are new
draws.  Prints one table: build time, median query latency (one query at a
time, as ``flow query`` runs) and recall@10 against exact cosine search.

    python bench/bench_index.py                 # 100k x 64-d, 1000 queries
    python bench/bench_index.py --n 20000 --queries 300 --repeats 1   # quick

Latencies are medians over queries of the median of ``--repeats`` passes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flow import Items  # noqa: E402
from nodes.codes import coder, encode  # noqa: E402
from nodes.index import (  # noqa: E402
    CodeSearcher,
    ExactSearcher,
    VectorSearcher,
    code_index,
    vector_index,
)


def _data(n: int, queries: int, dim: int, centers: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim))
    comp = rng.integers(0, centers, n + queries)
    x = c[comp] + noise * rng.standard_normal((n + queries, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    labels = [(f"g{g % 14}", f"h{g % 5}") for g in comp]  # coarse, multi-label
    return x[:n], labels[:n], x[n:]


def _items(values) -> Items:
    ids = [f"{i:08d}" for i in range(len(values))]
    return Items(ids, [b""] * len(ids), list(values))


def _timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def _latency(search, queries: np.ndarray, repeats: int):
    """Per-query results and the median per-query latency in ms."""
    times = np.zeros((repeats, len(queries)))
    found = []
    for r in range(repeats):
        found = []
        for i, q in enumerate(queries):
            t = time.perf_counter()
            idx, _ = search(q)
            times[r, i] = time.perf_counter() - t
            found.append(idx[0])
    return np.stack(found), float(np.median(np.median(times, axis=0)) * 1e3)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--centers", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=1.0, help="per-dimension, centers ~N(0,1)")
    ap.add_argument("--trees", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hnsw", action="store_true")
    ap.add_argument("--hnsw-threads", type=int, default=2)
    a = ap.parse_args()
    k = 10
    x, labels, q = _data(a.n, a.queries, a.dim, a.centers, a.noise, seed=0)
    rows: list[tuple] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-index-"))

    def row(what, build="", ms="", recall="", note=""):
        rows.append((what, build, ms, recall, note))
        print(rows[-1], flush=True)

    print(f"# n={a.n} dim={a.dim} queries={a.queries} centers={a.centers} noise={a.noise}")
    ex = ExactSearcher(x)
    (truth, _), t_all = _timed(ex.search, q, k)
    _, lat = _latency(lambda v: ex.search(v, k), q[:50], 1)
    row("exact (numpy, float64)", "", f"{lat:.2f}", "1.000", f"batched: {t_all:.1f} s in all")

    for trees in a.trees:
        out, t_build = _timed(vector_index, _items(x), trees=trees, seed=0)
        path = tmp / f"v{trees}.ann"
        path.write_bytes(out["annoy"].data)
        row(
            f"vector_index annoy trees={trees}",
            f"{t_build:.1f}",
            note=f"{path.stat().st_size >> 20} MiB",
        )
        with VectorSearcher(path, a.dim) as s:
            for sk in (-1, 2000, 5000, 20000):
                found, lat = _latency(lambda v, s=s, sk=sk: s.search(v, k, sk), q, a.repeats)
                what = f"  annoy search_k={sk if sk > 0 else f'-1 (={trees * k})'}"
                row(what, "", f"{lat:.3f}", f"{_recall(found, truth):.3f}")

    c, t_fit = _timed(coder, _items(x), _items(labels), bits=a.bits)
    row(f"coder cca-itq {a.bits} bits", f"{t_fit:.1f}", note=f"label bits {c['label_bits']}")
    c_itq, t_fit = _timed(coder, _items(x), _items([()] * len(x)), bits=a.bits)
    row(f"coder itq {a.bits} bits", f"{t_fit:.1f}")
    for name, cd in (("itq", c_itq), ("cca-itq", c)):
        db_codes, t_enc = _timed(encode, x, cd)
        row(f"encode {name}, all items", f"{t_enc:.1f}")
        out, t_build = _timed(code_index, _items(list(db_codes)), _items(x), trees=50, seed=0)
        row(f"code_index {name} trees=50", f"{t_build:.1f}")
        paths = {f: tmp / f"{name}.{f}" for f in ("hamming", "codes", "vectors")}
        for f, p in paths.items():
            p.write_bytes(out[f].data)
        for mode in ("exact", "annoy"):
            extra = {"codes_path": paths["codes"]} if mode == "exact" else {}
            with CodeSearcher(paths["hamming"], paths["vectors"], a.bits, **extra) as s:
                for sl in (100, 500) if mode == "exact" else (100,):

                    def one(v, s=s, sl=sl, cd=cd):
                        return s.search(v, k, codes=encode(v, cd)[None], shortlist=sl)

                    found, lat = _latency(one, q, a.repeats)
                    what = f"  {name} {mode} Hamming shortlist={sl} + re-rank"
                    row(what, "", f"{lat:.3f}", f"{_recall(found, truth):.3f}", "incl. encode")

    if not a.no_hnsw:
        import hnswlib

        index = hnswlib.Index(space="cosine", dim=a.dim)
        t = time.perf_counter()
        index.init_index(max_elements=a.n, ef_construction=200, M=16, random_seed=0)
        index.add_items(x, np.arange(a.n), num_threads=a.hnsw_threads)
        t_build = time.perf_counter() - t
        row("hnswlib M=16 efC=200", f"{t_build:.1f}", note=f"{a.hnsw_threads} build threads")
        index.set_num_threads(1)
        for ef in (10, 32, 64, 128):
            index.set_ef(ef)
            found, lat = _latency(lambda v, i=index: i.knn_query(v, k=k), q, a.repeats)
            row(f"  hnswlib ef={ef}", "", f"{lat:.3f}", f"{_recall(found, truth):.3f}")

    # query start-up: fresh interpreters; the search path's share is the difference
    probes = {
        "python": "pass",
        "python + numpy": "import numpy",
        "python + open index + 1 query": (
            "import sys, numpy as np; sys.path.insert(0, sys.argv[1])\n"
            "from nodes.index import VectorSearcher\n"
            "d = int(sys.argv[3])\n"
            "VectorSearcher(sys.argv[2], d).search(np.ones(d, 'f4'), 10)\n"
        ),
    }
    index_file = str(tmp / f"v{a.trees[-1]}.ann")
    for name, code in probes.items():
        starts = []
        for _ in range(5):
            t = time.perf_counter()
            cmd = [sys.executable, "-c", code, str(ROOT), index_file, str(a.dim)]
            subprocess.run(cmd, check=True)
            starts.append(time.perf_counter() - t)
        row(f"start-up: {name}", "", f"{np.median(starts) * 1e3:.0f}", "", "fresh process")
    print()
    header = ("what", "build s", "ms/query", "recall@10", "note")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print(" | ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    for p in tmp.iterdir():
        os.remove(p)
    tmp.rmdir()


if __name__ == "__main__":
    main()
