"""Annoy indices and the search API (VectorSearcher, CodeSearcher, ExactSearcher, merges)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flow import Items
from nodes.codes import coder, encode
from nodes.index import (
    CodeSearcher,
    ExactSearcher,
    VectorSearcher,
    code_index,
    merge_results,
    vector_index,
)

ROOT = Path(__file__).resolve().parents[2]


def _items(values, ids=None) -> Items:
    ids = ids or [f"item{i:05d}" for i in range(len(values))]
    return Items(ids, [b"k"] * len(ids), list(values))


def _clustered(n: int, dim: int = 32, centers: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few centers: 'easy' data for an ANN index."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim))
    x = c[rng.integers(0, centers, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write(tmp_path: Path, name: str, blob) -> Path:
    path = tmp_path / name
    path.write_bytes(blob.data)
    return path


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


@pytest.fixture(scope="module")
def data():
    return _clustered(3000)


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("index")
    out = vector_index(_items(data), trees=20, seed=1)
    return out, _write(tmp, "v.ann", out["annoy"])


def test_vector_index_output_and_same_bytes_twice(data, built):
    out, _ = built
    again = vector_index(_items(data), trees=20, seed=1)
    assert out["annoy"].data == again["annoy"].data
    assert (out["dim"], out["count"], out["metric"]) == (32, 3000, "angular")
    assert out["ids"] == tuple(f"item{i:05d}" for i in range(3000))
    other_seed = vector_index(_items(data), trees=20, seed=2)
    assert other_seed["annoy"].data != out["annoy"].data


def test_vector_index_same_bytes_in_a_fresh_process(tmp_path):
    code = (
        "import hashlib, sys; sys.path.insert(0, sys.argv[1])\n"
        "from tests.nodes.test_index import _clustered, _items\n"
        "from nodes.index import vector_index\n"
        "out = vector_index(_items(_clustered(500)), trees=5, seed=1)\n"
        "print(hashlib.sha256(out['annoy'].data).hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, check=True
    )
    import hashlib

    here = vector_index(_items(_clustered(500)), trees=5, seed=1)
    assert out.stdout.strip() == hashlib.sha256(here["annoy"].data).hexdigest()


def test_vector_search_matches_exact_on_easy_data(data, built):
    out, path = built
    queries = _clustered(200, seed=5)
    truth, truth_d = ExactSearcher(data).search(queries, 10)
    with VectorSearcher(path, out["dim"]) as s:
        assert s.count == 3000
        found, dist = s.search(queries, 10, search_k=20 * 10 * 20)
        default, _ = s.search(queries, 10)
    assert found.shape == (200, 10) and found.dtype == np.int64 and dist.dtype == np.float32
    assert _recall(found, truth) >= 0.95
    assert 0.5 <= _recall(default, truth) <= _recall(found, truth)  # search_k buys recall
    # distances are cosine distances, ascending
    assert np.all(np.diff(dist, axis=1) >= 0)
    hit = found == truth
    np.testing.assert_allclose(dist[hit], truth_d[hit], atol=1e-5)
    cos = np.einsum("qd,qkd->qk", queries.astype(np.float64), data[found].astype(np.float64))
    np.testing.assert_allclose(dist, 1 - cos, atol=1e-5)


def test_exclude_never_returns_the_query_itself(data, built):
    out, path = built
    q = data[:100]
    own = [{i} for i in range(100)]
    with VectorSearcher(path, out["dim"]) as s:
        plain, _ = s.search(q, 5)
        assert np.array_equal(plain[:, 0], np.arange(100))  # itself, at distance 0
        idx, _ = s.search(q, 5, exclude=own)
        assert not np.any(idx == np.arange(100)[:, None])
        assert np.all(idx >= 0)
        both, _ = s.search(q, 5, exclude={0, 1})  # one set for every query
        assert not np.isin(both, [0, 1]).any()
    exact, _ = ExactSearcher(data).search(q, 5, exclude=own)
    assert not np.any(exact == np.arange(100)[:, None])
    assert _recall(idx, exact) >= 0.9


def test_fewer_items_than_k_are_padded(tmp_path):
    x = _clustered(3)
    out = vector_index(_items(x), trees=2)
    with VectorSearcher(_write(tmp_path, "v.ann", out["annoy"]), 32) as s:
        idx, dist = s.search(x[0], 5, exclude={0})
    assert idx.tolist() == [[1, 2, -1, -1, -1]] or idx.tolist() == [[2, 1, -1, -1, -1]]
    assert np.isinf(dist[0, 2:]).all()
    e_idx, _ = ExactSearcher(x).search(x[0], 5, exclude={0})
    assert sorted(e_idx[0, :2].tolist()) == [1, 2] and (e_idx[0, 2:] == -1).all()


def test_empty_index(tmp_path):
    out = vector_index(_items([]))
    assert out["count"] == 0 and out["ids"] == () and out["annoy"].data == b""
    with VectorSearcher(_write(tmp_path, "e.ann", out["annoy"]), 8) as s:
        idx, dist = s.search(np.ones((2, 8), np.float32), 3)
    assert (idx == -1).all() and np.isinf(dist).all()


def test_vector_index_rejects_bad_vectors():
    x = list(_clustered(10))
    x[4] = np.full(32, np.inf, np.float32)
    with pytest.raises(ValueError, match="item00004"):
        vector_index(_items(x))
    x[4] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"item00004.*shape"):
        vector_index(_items(x))


# --------------------------------------------------------------------------
# codes


@pytest.fixture(scope="module")
def code_built(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("codes")
    labels = [(f"c{int(v[0] > 0)}", f"d{int(v[1] > 0)}") for v in data]
    c = coder(_items(data), _items(labels), bits=64, label_fraction=0.25)
    out = code_index(_items(list(encode(data, c))), _items(data), trees=20)
    paths = [_write(tmp, n, out[f]) for n, f in [("h.ann", "hamming"), ("v.npy", "vectors")]]
    return c, out, *paths, _write(tmp, "c.npy", out["codes"])


def test_code_index_output_is_deterministic(data, code_built):
    c, out, *_ = code_built
    again = code_index(_items(list(encode(data, c))), _items(data), trees=20)
    for name in ("hamming", "codes", "vectors"):
        assert again[name].data == out[name].data
    assert (out["bits"], out["dim"], out["count"]) == (64, 32, 3000)


def test_code_index_needs_the_same_items(data, code_built):
    c, *_ = code_built
    ids = [f"item{i:05d}" for i in range(10)]
    with pytest.raises(ValueError, match="same items"):
        code_index(_items(list(encode(data[:10], c)), ids), _items(data[:9], ids[:9]))


def test_hamming_ranking_is_by_hamming_distance_then_index(data, code_built):
    c, _, hpath, vpath, cpath = code_built
    q = data[:20]
    qc = encode(q, c)
    db = np.unpackbits(encode(data, c), axis=1)
    true = (np.unpackbits(qc, axis=1)[:, None, :] != db[None]).sum(axis=2)
    expected = np.lexsort((np.broadcast_to(np.arange(len(data)), true.shape), true), axis=1)
    with CodeSearcher(None, vpath, 64, codes_path=cpath) as s:
        idx, dist = s.search(None, 30, codes=qc, rerank=False)
    assert np.array_equal(idx, expected[:, :30])
    assert np.array_equal(dist, np.take_along_axis(true, idx, axis=1).astype(np.float32))
    # annoy's Hamming forest is approximate; an exhaustive search_k makes it exact
    with CodeSearcher(hpath, vpath, 64) as s:
        _, a_dist = s.search(None, 30, search_k=10**6, codes=qc, rerank=False)
    assert np.array_equal(a_dist, dist)


@pytest.mark.parametrize("exact_hamming", [True, False])
def test_shortlist_is_reranked_in_exact_cosine_order(data, code_built, exact_hamming):
    c, _, hpath, vpath, cpath = code_built
    q = _clustered(30, seed=9)
    opened = {"codes_path": cpath} if exact_hamming else {}
    with CodeSearcher(hpath, vpath, 64, coder=c, **opened) as s:
        short, _ = s.search(q, 300, shortlist=300, rerank=False)  # the shortlist itself
        idx, dist = s.search(q, 10, shortlist=300)
        same, _ = s.search(q, 10, shortlist=300, codes=encode(q, c))
    assert np.array_equal(idx, same)
    for i in range(len(q)):
        sub = short[i]
        e_idx, e_dist = ExactSearcher(data[sub]).search(q[i], 10)
        assert np.array_equal(idx[i], sub[e_idx[0]])
        assert np.array_equal(dist[i], e_dist[0])
    truth, _ = ExactSearcher(data).search(q, 10)
    # 10% of the items by 64-bit code hold most of the cosine top 10 (measured: 0.67)
    assert _recall(idx, truth) >= (0.6 if exact_hamming else 0.45)


@pytest.mark.parametrize("exact_hamming", [True, False])
def test_code_search_exclude(data, code_built, exact_hamming):
    c, _, hpath, vpath, cpath = code_built
    opened = {"codes_path": cpath} if exact_hamming else {}
    with CodeSearcher(hpath, vpath, 64, coder=c, **opened) as s:
        plain, _ = s.search(data[:50], 10)
        idx, _ = s.search(data[:50], 10, exclude=[{i} for i in range(50)])
        ham, _ = s.search(data[:50], 10, exclude=[{i} for i in range(50)], rerank=False)
    assert np.array_equal(plain[:, 0], np.arange(50))
    for found in (idx, ham):
        assert not np.any(found == np.arange(50)[:, None])
        assert np.all(found >= 0)


def test_code_searcher_needs_codes_or_a_coder(code_built):
    _, _, hpath, vpath, _ = code_built
    with (
        CodeSearcher(hpath, vpath, 64) as s,
        pytest.raises(ValueError, match="coder"),
    ):
        s.search(np.zeros((1, 32), np.float32), 5)


# --------------------------------------------------------------------------
# segments


@st.composite
def _segmented(draw):
    n = draw(st.integers(1, 40))
    dim = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # small integers: many exact ties and duplicate vectors, the hard case for a merge
    x = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    if draw(st.booleans()):
        x = rng.standard_normal((n, dim)).astype(np.float32)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    q = rng.integers(-2, 3, size=(draw(st.integers(1, 5)), dim)).astype(np.float32)
    k = draw(st.integers(1, n + 2))
    return x, [0, *cuts, n], q, k


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_segmented())
def test_segment_merge_equals_one_exact_index(case):
    x, bounds, q, k = case
    whole_i, whole_d = ExactSearcher(x).search(q, k)
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        i, d = ExactSearcher(x[lo:hi]).search(q, k)
        parts.append((i, d, lo))
    merged_i, merged_d = merge_results(parts, k)
    assert np.array_equal(merged_i, whole_i)
    assert np.array_equal(merged_d, whole_d)
    # ties are broken by the lower index
    for row_i, row_d in zip(whole_i, whole_d):
        valid = row_i >= 0
        pairs = list(zip(row_d[valid].tolist(), row_i[valid].tolist()))
        assert pairs == sorted(pairs)


def test_segment_merge_of_vector_searches(tmp_path):
    x = _clustered(600, seed=3)
    q = _clustered(40, seed=4)
    parts = []
    for j, (lo, hi) in enumerate([(0, 250), (250, 260), (260, 600)]):
        out = vector_index(_items(x[lo:hi]), trees=10)
        with VectorSearcher(_write(tmp_path, f"s{j}.ann", out["annoy"]), 32) as s:
            i, d = s.search(q, 10, search_k=100000)
        parts.append((i, d, lo))
    merged, dist = merge_results(parts)
    truth, truth_d = ExactSearcher(x).search(q, 10)
    assert np.array_equal(merged, truth)
    np.testing.assert_allclose(dist, truth_d, atol=1e-5)


def test_merge_results_pads_and_checks():
    a = (np.array([[0, -1]]), np.array([[0.5, np.inf]], np.float32), 10)
    b = (np.array([[1, 0]]), np.array([[0.5, 0.1]], np.float32), 0)
    idx, dist = merge_results([a, b], 4)
    assert idx.tolist() == [[0, 1, 10, -1]]
    assert dist[0, :3].tolist() == pytest.approx([0.1, 0.5, 0.5])
    with pytest.raises(ValueError):
        merge_results([])


def test_search_path_imports_no_heavy_libraries(built):
    out, path = built
    code = (
        "import sys, json, time; sys.path.insert(0, sys.argv[1])\n"
        "import numpy as np\n"
        "from nodes.index import VectorSearcher\n"
        "s = VectorSearcher(sys.argv[2], int(sys.argv[3]))\n"
        "s.search(np.ones(int(sys.argv[3]), np.float32), 10)\n"
        "heavy = ('zarr', 'dask', 'torch', 'sklearn', 'distributed')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(path), str(out["dim"])],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(res.stdout) == []


# --------------------------------------------------------------------------
# the hnsw backend (same interface as annoy)

needs_hnsw = pytest.mark.skipif(
    importlib.util.find_spec("hnswlib") is None, reason="hnswlib is not installed"
)


@pytest.fixture(scope="module")
def hnsw_built(data, tmp_path_factory):
    out = vector_index.fn(_items(data), backend="hnsw", m=16, ef_construction=100, seed=0)
    return out, _write(tmp_path_factory.mktemp("hnsw"), "index.bin", out["hnsw"])


@needs_hnsw
def test_hnsw_index_is_deterministic_and_labelled(data, hnsw_built):
    out, _ = hnsw_built
    again = vector_index.fn(_items(data), backend="hnsw", m=16, ef_construction=100, seed=0)
    assert out["hnsw"].data == again["hnsw"].data
    assert out["backend"] == "hnsw" and out["count"] == len(data) and "annoy" not in out


@needs_hnsw
def test_hnsw_search_matches_exact_and_excludes(data, hnsw_built):
    from nodes._hnsw import HnswSearcher

    out, path = hnsw_built
    s = HnswSearcher(path, out["dim"], out["count"])
    q = data[:50]
    idx, dist = s.search(q, 10, search_k=200)
    truth, tdist = ExactSearcher(data).search(q, 10)
    assert _recall(idx, truth) >= 0.95
    assert np.allclose(dist[:, 0], tdist[:, 0], atol=1e-5)  # same 1 - cos distances
    idx2, _ = s.search(q, 10, exclude=[{i} for i in range(50)])
    assert all(i not in row for i, row in enumerate(idx2.tolist()))


@needs_hnsw
def test_backends_merge_across_segments(data, tmp_path):
    """An annoy segment and an hnsw segment answer in one distance space."""
    from nodes._hnsw import HnswSearcher

    a, b = data[:300], data[300:]
    ia = vector_index.fn(_items(a), backend="annoy", trees=50)
    ib = vector_index.fn(_items(b), backend="hnsw")
    sa = VectorSearcher(_write(tmp_path, "a.ann", ia["annoy"]), ia["dim"])
    sb = HnswSearcher(_write(tmp_path, "b.bin", ib["hnsw"]), ib["dim"], ib["count"])
    q = data[::37]
    merged, _ = merge_results(
        [(*sa.search(q, 10, search_k=20000), 0), (*sb.search(q, 10, search_k=400), 300)], 10
    )
    truth, _ = ExactSearcher(data).search(q, 10)
    assert _recall(merged, truth) >= 0.95


def test_unknown_backend_is_refused(data):
    with pytest.raises(ValueError, match="backend"):
        vector_index.fn(_items(data[:10]), backend="faiss")
