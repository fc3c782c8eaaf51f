"""The code generator (CCA-ITQ / ITQ) and the codes node."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flow import ItemError, Items
from nodes.codes import coder, codes, encode
from nodes.metrics import retrieval_metrics

ROOT = Path(__file__).resolve().parents[2]


def _items(values, ids=None) -> Items:
    ids = ids or [f"item{i:05d}" for i in range(len(values))]
    return Items(ids, [b"k"] * len(ids), list(values))


def _labeled_problem(
    n: int, seed: int = 0, signal: float = 0.25, dim: int = 64, n_labels: int = 10
):
    """Multi-label vectors whose label signal is weaker than a nuisance factor,
    so unsupervised codes spend their bits on the nuisance."""
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((n_labels, dim))
    y = np.zeros((n, n_labels), bool)
    for i in range(n):
        y[i, rng.choice(n_labels, rng.integers(1, 4), replace=False)] = True
    nuisance = rng.standard_normal((n, 8)) @ rng.standard_normal((8, dim)) * 1.5
    x = y @ protos * signal + nuisance + rng.standard_normal((n, dim)) * 0.8
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = [tuple(f"L{j}" for j in np.flatnonzero(row)) for row in y]
    return x.astype(np.float32), labels, y


def _hamming_rankings(query_codes: np.ndarray, db_codes: np.ndarray, k: int) -> np.ndarray:
    q = np.unpackbits(query_codes, axis=1)[:, None, :]
    d = np.unpackbits(db_codes, axis=1)[None, :, :]
    dist = (q != d).sum(axis=2)
    return np.argsort(dist, axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def problem():
    x, labels, y = _labeled_problem(1100)
    return x[:800], labels[:800], y[:800], x[800:], y[800:]


def test_codes_shape_dtype_and_batch_independence(problem):
    x, labels, *_ = problem
    c = coder(_items(x), _items(labels), bits=32)
    assert c["projection"].shape == (64, 32) and c["projection"].dtype == np.float32
    assert c["mean"].shape == (64,) and c["mean"].dtype == np.float32
    assert c["bits"] == 32 and c["method"] == "cca-itq" and c["dim"] == 64
    one = codes(x[0], c)
    assert one.dtype == np.uint8 and one.shape == (4,)
    batch = encode(x[:50], c)
    assert batch.shape == (50, 4)
    assert all(np.array_equal(codes(v, c), b) for v, b in zip(x[:50], batch))
    # the bits are the signs of (x - mean) @ projection, packed high bit first
    ref = (x[:50].astype(np.float64) - c["mean"]) @ c["projection"].astype(np.float64) > 0
    assert np.array_equal(np.unpackbits(batch, axis=1), ref)


def test_coder_is_deterministic_and_seeded(problem):
    x, labels, *_ = problem
    a = coder(_items(x), _items(labels), bits=64, seed=3)
    b = coder(_items(x), _items(labels), bits=64, seed=3)
    c = coder(_items(x), _items(labels), bits=64, seed=4)
    for name in ("mean", "projection"):
        assert a[name].tobytes() == b[name].tobytes()
    assert a["projection"].tobytes() != c["projection"].tobytes()


def test_coder_same_bytes_in_a_fresh_process(problem):
    x, labels, *_ = problem
    here = coder(_items(x[:300]), _items(labels[:300]), bits=16)
    code = (
        "import hashlib, sys; sys.path.insert(0, sys.argv[1])\n"
        "from tests.nodes.test_codes import _labeled_problem, _items\n"
        "from nodes.codes import coder, encode\n"
        "x, labels, _ = _labeled_problem(1100)\n"
        "c = coder(_items(x[:300]), _items(labels[:300]), bits=16)\n"
        "data = c['projection'].tobytes() + encode(x[:300], c).tobytes()\n"
        "print(hashlib.sha256(data).hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, check=True
    )
    expected = hashlib.sha256(here["projection"].tobytes() + encode(x[:300], here).tobytes())
    assert out.stdout.strip() == expected.hexdigest()


def test_supervised_codes_beat_itq_in_hamming_ranking(problem):
    x, labels, _, xq, yq = problem
    _, _, y_db = _labeled_problem(1100)
    y_db = y_db[:800]
    scores = {}
    for method in ("supervised", "itq"):
        c = coder(_items(x), _items(labels), bits=64, method=method)
        ranks = _hamming_rankings(encode(xq, c), encode(x, c), 10)
        scores[method] = retrieval_metrics(yq, y_db, ranks, ks=(10,))
    sup, itq = scores["supervised"], scores["itq"]
    assert sup["precision"][10] > itq["precision"][10] + 0.2
    assert sup["avg"][10] > 1.5 * itq["avg"][10]


def test_itq_rotation_lowers_quantization_loss(problem):
    x, *_ = problem
    no_labels = _items([()] * len(x))
    start = coder(_items(x), no_labels, bits=32, iterations=0)
    fitted = coder(_items(x), no_labels, bits=32, iterations=50)
    assert fitted["quantization_loss"] < start["quantization_loss"] - 0.01


def test_itq_fallback_when_no_item_has_labels(problem):
    x, *_ = problem
    fallback = coder(_items(x), _items([()] * len(x)), bits=32)
    explicit = coder(_items(x), _items([]), bits=32, method="itq")
    assert fallback["method"] == "itq" and fallback["label_bits"] == 0
    assert fallback["n_labeled"] == 0
    assert fallback["projection"].tobytes() == explicit["projection"].tobytes()
    # ITQ bits are balanced on the training data (centered, rotated)
    share = np.unpackbits(encode(x, fallback), axis=1).mean(axis=0)
    assert np.all((share > 0.3) & (share < 0.7))


def test_labels_matched_by_id_in_any_form(problem):
    x, labels, *_ = problem
    ids = [f"item{i:05d}" for i in range(len(x))]
    tuples = coder(_items(x, ids), _items(labels, ids), bits=16)
    joined = ["|".join(t) for t in labels]
    # labels given as 'A|B' strings, for every other item only, in another id set
    half = ids[::2]
    partial = coder(_items(x, ids), _items([joined[i] for i in range(0, len(x), 2)], half), bits=16)
    strings = coder(_items(x, ids), _items(joined, ids), bits=16)
    assert strings["projection"].tobytes() == tuples["projection"].tobytes()
    assert partial["n_labeled"] == len(half) and partial["method"] == "cca-itq"
    assert tuples["labels"] == tuple(f"L{j}" for j in range(10))


def test_few_labels_do_not_collapse_the_code():
    """One canonical direction (a binary task) makes at most 8 label bits; the
    rest are ITQ bits, so codes still tell items apart."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 32)).astype(np.float32)
    labels = [("sick",) if v[0] > 0 else ("normal",) for v in x]
    c = coder(_items(x), _items(labels), bits=64)
    assert c["method"] == "cca-itq" and c["label_bits"] == 8
    distinct = {bytes(row) for row in encode(x, c)}
    assert len(distinct) > 300
    only = coder(_items(x), _items(labels), bits=64, label_fraction=0.0)
    assert only["method"] == "itq"


def test_bits_beyond_the_embedding_dimension():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    c = coder(_items(x), _items([()] * 300), bits=32)
    assert c["projection"].shape == (8, 32)
    # a semi-orthogonal rotation: 32 distinct hyperplanes, not 8 repeated
    cols = c["projection"] / np.linalg.norm(c["projection"], axis=0)
    cos = np.abs(cols.T @ cols) - np.eye(32)
    assert cos.max() < 0.999


@pytest.mark.parametrize(
    ("params", "message"),
    [({"bits": 12}, "multiple of 8"), ({"method": "lsh"}, "method"), ({"bits": 0}, "multiple")],
)
def test_coder_rejects_bad_parameters(problem, params, message):
    x, labels, *_ = problem
    with pytest.raises(ValueError, match=message):
        coder(_items(x[:20]), _items(labels[:20]), **params)


def test_coder_names_a_bad_embedding(problem):
    x, labels, *_ = problem
    bad = list(x[:20])
    bad[7] = np.full(64, np.nan, np.float32)
    with pytest.raises(ValueError, match="item00007"):
        coder(_items(bad), _items(labels[:20]))
    bad[7] = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match=r"item00007.*shape"):
        coder(_items(bad), _items(labels[:20]))


def test_codes_reports_bad_items(problem):
    x, labels, *_ = problem
    c = coder(_items(x[:100]), _items(labels[:100]), bits=8)
    with pytest.raises(ItemError, match="shape"):
        codes(np.zeros(10, np.float32), c)
    with pytest.raises(ItemError, match="NaN"):
        codes(np.full(64, np.nan, np.float32), c)
