"""Cross-validation of the CNN embedder on nih-dev ``train`` only (``val`` stays unseen).

Run: ``python bench/cv_nih.py [--folds 5] [--use 0,1,2] [--params '{"epochs": 80}']``.

Patients are split into ``--folds`` groups; for each fold used, the embedder is
trained (the real ``nodes.embed.embedder`` node, with ``--params`` over its
defaults) on the other folds' images, which are also the database, and the
fold's images are the queries -- the shape of a real build, where the
database is the training set.  One trained network is read three ways:

* ``findings``: findings vectors ranked by inner product (query form), the default;
* ``findings_cos``: the same vectors ranked by plain cosine;
* ``embedding`` (``--embedding``: trains once more): the metric embedding
  under the head, by cosine;

beside the label-prior ranking and random.  Prints AvG@10, P@10, mAP@10 per
fold and their means.  This is how the embedder's defaults were chosen.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from app.evaluation import _prior_rankings
from flow import Items, key
from nodes import _cnn
from nodes.embed import embedder, embedding
from nodes.metrics import label_matrix, random_rankings, retrieval_metrics

NIH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nih-dev"


def load_train() -> tuple[list[np.ndarray], list[tuple[str, ...]], np.ndarray]:
    with open(NIH / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    images = [
        np.asarray(Image.open(NIH / r["file"]).convert("L"), dtype=np.float32) / 255 for r in rows
    ]
    labels = [tuple(r["finding_labels"].split("|")) for r in rows]
    return images, labels, np.array([int(r["patient_id"]) for r in rows])


def patient_folds(patients: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    ids = np.unique(patients)
    np.random.default_rng(seed).shuffle(ids)
    group = {p: i % k for i, p in enumerate(ids)}
    fold = np.array([group[p] for p in patients])
    return [np.flatnonzero(fold == i) for i in range(k)]


def _items(values: list, rows: np.ndarray) -> Items:
    ids = [f"i{r:05d}" for r in rows]
    return Items(ids, [key(i) for i in ids], [values[r] for r in rows])


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _summary(m: dict, k: int) -> dict[str, float]:
    return {name: round(m[name][k], 4) for name in ("avg", "precision", "map")}


def run_fold(
    images, labels, test, train, params: dict, k: int, with_embedding: bool
) -> dict[str, dict]:
    fit = embedder(_items(images, train), _items(labels, train), **params)
    db = np.stack(embedding([images[i] for i in train], fit)).astype(np.float64)
    q = np.stack(embedding([images[i] for i in test], fit)).astype(np.float64)
    qf = _cnn.query_form(q).astype(np.float64)
    rankings = {
        "findings": _top(qf @ db.T, k),
        "findings_cos": _top(q @ db.T, k),
    }
    if with_embedding:  # the same training (same seed and parameters), the embedding exported
        emb = embedder(
            _items(images, train), _items(labels, train), **{**params, "vectors": "embedding"}
        )
        e_db = np.stack(embedding([images[i] for i in train], emb))
        e_q = np.stack(embedding([images[i] for i in test], emb))
        rankings["embedding"] = _top(e_q.astype(np.float64) @ e_db.T.astype(np.float64), k)
    vocab = sorted({lab for labs in labels for lab in labs})
    qm, dm = (
        label_matrix([labels[i] for i in test], vocab)[0],
        label_matrix([labels[i] for i in train], vocab)[0],
    )
    none = -np.ones(len(test), dtype=np.int64)
    rankings["label_prior"] = _prior_rankings(dm, k, none)
    rankings["random"] = random_rankings(len(test), len(train), k, seed=0)
    return {
        name: _summary(retrieval_metrics(qm, dm, r, ks=(k,)), k) for name, r in rankings.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--use", default="0,1,2", help="which folds to run (comma-separated)")
    ap.add_argument("--params", default="{}", help="embedder parameters (JSON) over its defaults")
    ap.add_argument("--embedding", action="store_true", help="also read the embedding")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    if not (NIH / "labels.csv").exists():
        raise SystemExit(f"needs {NIH} (../shared/data beside the repository)")
    params = json.loads(a.params)
    images, labels, patients = load_train()
    folds = patient_folds(patients, a.folds)
    per_fold = []
    for f in (int(x) for x in a.use.split(",")):
        test = folds[f]
        train = np.setdiff1d(np.arange(len(images)), test)
        t0 = time.perf_counter()
        res = run_fold(images, labels, test, train, params, a.k, a.embedding)
        print(f"fold {f} ({len(test)} queries, {time.perf_counter() - t0:.0f} s):", flush=True)
        for name, m in res.items():
            print(f"  {name:13s} " + "  ".join(f"{n}@{a.k} {v:.3f}" for n, v in m.items()))
        per_fold.append(res)
    mean = {
        name: {
            m: round(float(np.mean([r[name][m] for r in per_fold])), 4) for m in per_fold[0][name]
        }
        for name in per_fold[0]
    }
    print("mean over folds:")
    for name, m in mean.items():
        print(f"  {name:13s} " + "  ".join(f"{n}@{a.k} {v:.3f}" for n, v in m.items()))
    if a.json:
        a.json.write_text(json.dumps({"params": params, "folds": per_fold, "mean": mean}, indent=1))


if __name__ == "__main__":
    main()
