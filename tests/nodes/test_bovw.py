"""Tests for the superpixel bag-of-visual-words nodes (nodes/bovw.py)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from flow import ItemError, Items
from nodes.bovw import bovw_histogram, descriptors, vocabulary
from nodes.metrics import label_matrix, random_rankings, retrieval_metrics

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".." / "shared" / "data"

# small images: the 64 px settings
DESC = {"n_segments": 50, "patch": 12}
DIM = 4 * 4 + 3


def _blobs(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Smooth image: a few Gaussian bumps on a dark background."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size))
    for _ in range(3):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(0.05, 0.12) ** 2))
    img += rng.normal(0, 0.02, img.shape)
    return np.clip(img / img.max(), 0, 1).astype(np.float32)


def _stripes(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Fine oriented grating."""
    yy, xx = np.mgrid[0:size, 0:size]
    theta, period = rng.uniform(0, np.pi), rng.uniform(5, 8)
    img = 0.5 + 0.4 * np.sin(2 * np.pi * (np.cos(theta) * xx + np.sin(theta) * yy) / period)
    img += rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(7)
    images = [_blobs(rng) for _ in range(16)] + [_stripes(rng) for _ in range(16)]
    classes = np.array([0] * 16 + [1] * 16)
    descs = [descriptors(im, **DESC) for im in images]
    return images, classes, descs


def _items(values) -> Items:
    ids = [f"img{i:04d}" for i in range(len(values))]
    return Items(ids, [b"k"] * len(values), values)


@pytest.fixture(scope="module")
def vocab(synthetic):
    return vocabulary(_items(synthetic[2]), words=24, sample=500, seed=0)


def test_descriptors_shapes_and_ranges(synthetic):
    d = synthetic[2][0]
    assert set(d) == {"descriptors", "centers"}
    assert d["descriptors"].dtype == np.float32 and d["centers"].dtype == np.float32
    n = len(d["descriptors"])
    assert 20 <= n <= 80  # about n_segments superpixels
    assert d["descriptors"].shape == (n, DIM) and d["centers"].shape == (n, 2)
    assert (d["centers"] >= 0).all() and (d["centers"] <= 63).all()
    # pattern part is unit length (or ~0 on flat patches), position part is scaled to [0, 4]
    norms = np.linalg.norm(d["descriptors"][:, :16], axis=1)
    assert (norms <= 1 + 1e-5).all() and (norms > 0.5).mean() > 0.5
    pos = d["descriptors"][:, -2:]
    np.testing.assert_allclose(pos, 4.0 * d["centers"] / 64, rtol=1e-5, atol=1e-5)


def test_descriptors_deterministic_bytes(synthetic):
    images, _, descs = synthetic
    again = descriptors(images[3], **DESC)
    for k in ("descriptors", "centers"):
        assert again[k].tobytes() == descs[3][k].tobytes()


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_blank_image_gives_no_descriptors_and_zero_histogram(value, vocab):
    d = descriptors(np.full((64, 64), value, np.float32), **DESC)
    assert d["descriptors"].shape == (0, DIM) and d["descriptors"].dtype == np.float32
    assert d["centers"].shape == (0, 2)
    h = bovw_histogram(d, vocab)
    assert h.shape == (24,) and h.dtype == np.float32 and not h.any()


def test_tiny_image_smaller_than_patch(vocab):
    img = np.array([[0.0, 1.0, 0.2], [0.5, 0.3, 0.9], [0.1, 0.8, 0.4]], np.float32)
    d = descriptors(img, **DESC)
    assert len(d["descriptors"]) >= 1 and np.isfinite(d["descriptors"]).all()
    h = bovw_histogram(d, vocab)
    assert abs(float(np.linalg.norm(h)) - 1) < 1e-5


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8, 3), np.float32), np.full((8, 8), np.nan), np.zeros((0, 5))]
)
def test_bad_image_is_an_item_error(bad):
    with pytest.raises(ItemError):
        descriptors(bad, **DESC)


def test_vocabulary_shapes_and_idf(synthetic, vocab):
    assert vocab["centroids"].shape == (24, DIM) and vocab["centroids"].dtype == np.float32
    assert vocab["idf"].shape == (24,) and vocab["idf"].dtype == np.float32
    assert (vocab["idf"] >= 1).all()  # smoothed idf never zeroes a word
    # a word present in every training item has the minimum idf ln(33/33) + 1 = 1
    n = len(synthetic[2])
    assert vocab["items"] == n and vocab["idf"].max() <= np.log((1 + n) / 1) + 1 + 1e-6
    assert vocab["sampled"] == 500


def test_vocabulary_depends_on_seed_and_is_reproducible(synthetic, vocab):
    again = vocabulary(_items(synthetic[2]), words=24, sample=500, seed=0)
    assert again["centroids"].tobytes() == vocab["centroids"].tobytes()
    assert again["idf"].tobytes() == vocab["idf"].tobytes()
    other = vocabulary(_items(synthetic[2]), words=24, sample=500, seed=1)
    assert other["centroids"].tobytes() != vocab["centroids"].tobytes()


def test_vocabulary_identical_in_fresh_process_with_other_thread_settings(
    synthetic, vocab, tmp_path
):
    np.savez(tmp_path / "d.npz", *[d["descriptors"] for d in synthetic[2]])
    script = (
        "import sys, numpy as np\n"
        "from flow import Items\n"
        "from nodes.bovw import vocabulary\n"
        "z = np.load(sys.argv[1]); vals = [{'descriptors': z[f'arr_{i}']} for i in range(len(z))]\n"
        "ids = [f'img{i:04d}' for i in range(len(vals))]\n"
        "v = vocabulary(Items(ids, [b'k'] * len(vals), vals), words=24, sample=500, seed=0)\n"
        "open(sys.argv[2], 'wb').write(v['centroids'].tobytes() + v['idf'].tobytes())\n"
    )
    # here with 3 threads allowed, there with 1: unpinned k-means differs between them
    with threadpool_limits(limits=3):
        here = vocabulary(_items(synthetic[2]), words=24, sample=500, seed=0)
    assert here["centroids"].tobytes() == vocab["centroids"].tobytes()
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = tmp_path / "v.bin"
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "d.npz"), str(out)],
        check=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert out.read_bytes() == vocab["centroids"].tobytes() + vocab["idf"].tobytes()


def test_vocabulary_refuses_too_few_distinct_descriptors():
    vals = [{"descriptors": np.ones((5, DIM), np.float32)} for _ in range(3)]
    with pytest.raises(ValueError, match="distinct"):
        vocabulary(_items(vals), words=4)
    blank = [{"descriptors": np.zeros((0, DIM), np.float32)} for _ in range(3)]
    with pytest.raises(ValueError, match="no training item"):
        vocabulary(_items(blank), words=4)


def test_histogram_unit_norm_nonnegative_deterministic(synthetic, vocab):
    for d in synthetic[2][::5]:
        h = bovw_histogram(d, vocab)
        assert h.shape == (24,) and h.dtype == np.float32
        assert (h >= 0).all() and abs(float(np.linalg.norm(h)) - 1) < 1e-5
        assert bovw_histogram(d, vocab).tobytes() == h.tobytes()
    hard = bovw_histogram(synthetic[2][0], vocab, neighbours=1)
    soft = bovw_histogram(synthetic[2][0], vocab)
    assert np.count_nonzero(hard) < np.count_nonzero(soft)


def test_histogram_rejects_mismatched_dimensions(synthetic, vocab):
    d = descriptors(synthetic[0][0], n_segments=50, patch=12, grid=3)
    with pytest.raises(ValueError, match="dimensions"):
        bovw_histogram(d, vocab)


def _precision_at(h: np.ndarray, classes: np.ndarray, k: int) -> float:
    sim = h @ h.T
    np.fill_diagonal(sim, -np.inf)
    ranked = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return float((classes[ranked] == classes[:, None]).mean())


@pytest.mark.parametrize("neighbours", [1, 10])
def test_two_visual_classes_retrieve_their_own_class(synthetic, vocab, neighbours):
    _, classes, descs = synthetic
    h = np.stack([bovw_histogram(d, vocab, neighbours=neighbours) for d in descs])
    assert _precision_at(h, classes, 5) >= 0.9  # chance is about 0.48


def _nih_subset():
    root = DATA / "nih-dev"
    if not (root / "labels.csv").is_file():
        pytest.skip("../shared/data/nih-dev is not here")
    from PIL import Image

    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r["split"] == "train"][::2]  # 300, spread over patients
    val = [r for r in rows if r["split"] == "val"]  # 200

    def load(rs):
        ims = [np.asarray(Image.open(root / r["file"]).convert("L"), np.float32) / 255 for r in rs]
        return ims, [r["finding_labels"].split("|") for r in rs]

    return load(train), load(val)


@pytest.mark.shared_data
@pytest.mark.slow
def test_nih_dev_subset_beats_random():
    (tr_im, tr_lab), (va_im, va_lab) = _nih_subset()
    params = {"n_segments": 100, "patch": 12}  # native 64 px
    d_tr = [descriptors(im, **params) for im in tr_im]
    d_va = [descriptors(im, **params) for im in va_im]
    voc = vocabulary(_items(d_tr), words=128, sample=20000)
    h_tr = np.stack([bovw_histogram(d, voc) for d in d_tr]).astype(np.float64)
    h_va = np.stack([bovw_histogram(d, voc) for d in d_va]).astype(np.float64)
    labels, _ = label_matrix(tr_lab + va_lab)
    lq, ldb = labels[len(tr_lab) :], labels[: len(tr_lab)]
    ranked = np.argsort(-(h_va @ h_tr.T), axis=1, kind="stable")[:, :10]
    got = retrieval_metrics(lq, ldb, ranked)["avg"][10]
    rand = [
        retrieval_metrics(lq, ldb, random_rankings(len(lq), len(ldb), 10, seed=s))["avg"][10]
        for s in range(10)
    ]
    # measured: 0.353 against random 0.323 +- 0.010
    assert got > np.mean(rand) + 2 * np.std(rand), (got, rand)
