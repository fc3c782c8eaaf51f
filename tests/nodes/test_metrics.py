"""Retrieval metrics and baselines on hand-made cases whose answers are worked out below."""

from __future__ import annotations

import numpy as np
import pytest

from nodes.metrics import (
    abnormal_precision,
    cosine_rankings,
    finding_metrics,
    label_macro_precision,
    label_matrix,
    normal_precision,
    per_label_precision,
    pixel_vectors,
    prior_rankings,
    random_rankings,
    retrieval_metrics,
)

VOCAB = ["Effusion", "Mass", "No Finding"]  # column 2 is the normal label
DB = [
    ("No Finding",),  # 0
    ("Effusion",),  # 1
    ("Effusion", "Mass"),  # 2
    ("Mass",),  # 3
    ("No Finding",),  # 4
    ("No Finding",),  # 5
]
QUERIES = [
    ("Effusion",),  # q0: gets 1 (shares), 0 (normal), 3 (other finding)
    ("Mass",),  # q1: gets 0, 4 (normal, normal), 2 (shares Mass)
    ("No Finding",),  # q2: gets 4 (normal), 1, 5 (normal)
    ("Effusion", "Mass"),  # q3: gets 3 (shares Mass), 0, 2 (shares both)
    ("No Finding",),  # q4: gets 0, 4, 5 (all normal)
]
RANKINGS = np.array([[1, 0, 3], [0, 4, 2], [4, 1, 5], [3, 0, 2], [0, 4, 5]])


@pytest.fixture
def case():
    q, _ = label_matrix(QUERIES, VOCAB)
    db, _ = label_matrix(DB, VOCAB)
    return q, db


def test_avg_precision_and_map_by_hand(case):
    q, db = case
    m = retrieval_metrics(q, db, RANKINGS, ks=(1, 3))
    # shared-label counts ("No Finding" counts): q0 [1,0,0], q1 [0,0,1], q2 [1,0,1],
    # q3 [1,0,2], q4 [1,1,1]
    assert m["avg"][1] == pytest.approx(4 / 5)
    assert m["avg"][3] == pytest.approx((1 + 1 + 2 + 3 + 3) / 3 / 5)
    assert m["precision"][1] == pytest.approx(4 / 5)
    assert m["precision"][3] == pytest.approx((1 + 1 + 2 + 2 + 3) / 3 / 5)
    # AP@3: q0 1, q1 1/3, q2 (1 + 2/3)/2, q3 the same, q4 1
    assert m["map"][3] == pytest.approx((1 + 1 / 3 + 5 / 6 + 5 / 6 + 1) / 5)


def test_abnormal_precision_by_hand(case):
    q, db = case
    # abnormal queries q0, q1, q3; shares a finding: q0 [1,0,0], q1 [0,0,1], q3 [1,0,1]
    got = abnormal_precision(q, db, RANKINGS, ks=(1, 3), normal=2)
    assert got[1] == pytest.approx(2 / 3)
    assert got[3] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    # "No Finding" is not a shared finding: a normal result for an abnormal query never
    # counts, even though both carry labels
    only_normal = np.zeros_like(RANKINGS)  # every query gets row 0 (normal) three times
    assert abnormal_precision(q, db, only_normal, ks=(3,), normal=2) == {3: 0.0}


def test_abnormal_precision_without_a_normal_label(case):
    q, db = case
    # normal=None: every label is a finding, so the normal queries count too:
    # q2 shares "No Finding" with [4, 5] of [4, 1, 5], q4 with all three
    got = abnormal_precision(q, db, RANKINGS, ks=(3,), normal=None)
    assert got[3] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3 + 2 / 3 + 1) / 5)


def test_normal_precision_by_hand(case):
    q, db = case
    # normal queries q2 [1,0,1] and q4 [1,1,1]
    got = normal_precision(q, db, RANKINGS, ks=(1, 3), normal=2)
    assert got[1] == pytest.approx(1.0)
    assert got[3] == pytest.approx((2 / 3 + 1) / 2)
    assert normal_precision(q, db, RANKINGS, ks=(3,), normal=None) == {3: None}


def test_per_label_and_label_macro_by_hand(case):
    q, db = case
    table = per_label_precision(q, db, RANKINGS, ks=(1, 3))
    # Effusion: q0 [1,0,0], q3 [0,0,1]; Mass: q1 [0,0,1], q3 [1,0,1];
    # No Finding: q2 [1,0,1], q4 [1,1,1]
    assert [n for n, _ in table] == [2, 2, 2]
    assert table[0][1] == pytest.approx({1: 0.5, 3: 1 / 3})
    assert table[1][1] == pytest.approx({1: 0.5, 3: 0.5})
    assert table[2][1] == pytest.approx({1: 1.0, 3: 5 / 6})
    macro = label_macro_precision(q, db, RANKINGS, ks=(1, 3), min_queries=2)
    assert macro[1] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert macro[3] == pytest.approx((1 / 3 + 1 / 2 + 5 / 6) / 3)
    # the default needs 3 queries per label: no label qualifies here
    assert label_macro_precision(q, db, RANKINGS, ks=(3,)) == {3: None}


def test_label_macro_leaves_out_labels_with_too_few_queries(case):
    q, db = case
    keep = [0, 1, 2, 4]  # Effusion and Mass have one query each now, No Finding two
    macro = label_macro_precision(q[keep], db, RANKINGS[keep], ks=(1, 3), min_queries=2)
    assert macro == pytest.approx({1: 1.0, 3: 5 / 6})
    # a rare label weighs as much as a common one: one label each way
    q2 = np.array([[1, 0], [0, 1], [0, 1], [0, 1]], bool)
    db2 = np.array([[1, 0], [0, 1]], bool)
    r = np.array([[0], [1], [1], [1]])  # every query gets its own label
    assert label_macro_precision(q2, db2, r, ks=(1,), min_queries=1) == {1: 1.0}
    r_bad = np.array([[1], [1], [1], [1]])  # the rare label's query gets the common one
    assert label_macro_precision(q2, db2, r_bad, ks=(1,), min_queries=1) == {1: 0.5}
    assert retrieval_metrics(q2, db2, r_bad, ks=(1,))["precision"][1] == 0.75


def test_finding_metrics_names_the_normal_label(case):
    q, db = case
    m = finding_metrics(q, db, RANKINGS, ks=(1, 3), vocabulary=VOCAB, min_queries=2)
    assert m["abnormal"] == abnormal_precision(q, db, RANKINGS, ks=(1, 3), normal=2)
    assert m["normal"] == normal_precision(q, db, RANKINGS, ks=(1, 3), normal=2)
    assert m["label_macro"][3] == pytest.approx(5 / 9)
    # normal results of abnormal queries: q0 [0,1,0], q1 [1,1,0], q3 [0,1,0]
    assert m["normal_to_abnormal"] == pytest.approx({1: 1 / 3, 3: 4 / 9})
    assert m["per_label"]["Mass"] == {"queries": 2, "precision": pytest.approx({1: 0.5, 3: 0.5})}
    assert m["abnormal_queries"] == 3 and m["normal_queries"] == 2
    with pytest.raises(ValueError, match="vocabulary"):
        finding_metrics(q, db, RANKINGS, ks=(1,), vocabulary=VOCAB[:2])
    # no normal label in the vocabulary: normal P@K is None, every label a finding
    m2 = finding_metrics(q[:, :2], db[:, :2], RANKINGS, ks=(3,), vocabulary=VOCAB[:2])
    assert m2["normal"] == {3: None} and m2["normal_queries"] == 0


def test_metrics_refuse_short_rankings(case):
    q, db = case
    with pytest.raises(ValueError, match="K=5"):
        abnormal_precision(q, db, RANKINGS, ks=(5,), normal=2)
    with pytest.raises(ValueError, match="n_queries"):
        per_label_precision(q, db, RANKINGS[:2], ks=(1,))


# --------------------------------------------------------------------------
# baselines


def test_prior_is_image_blind_most_frequent_label_sets_first(case):
    q, db = case
    # "No Finding" (rows 0, 4, 5) is the most frequent set; then the singletons,
    # the one sharing most labels with the others first (row 2: Effusion and Mass)
    r = prior_rankings(db, 5, np.array([-1, -1, 4, -1, -1]))
    assert r[0].tolist() == [0, 4, 5, 2, 1]
    assert r[2].tolist() == [0, 5, 2, 1, 3]  # query 2 is row 4: never itself
    m = finding_metrics(q, db, r[[0, 0, 0, 0, 0], :3], ks=(3,), vocabulary=VOCAB)
    assert m["abnormal"] == {3: 0.0} and m["normal"] == {3: 1.0}
    # query 2 without itself gets [0, 5, 2]: normal P@3 (2/3 + 1) / 2
    m = finding_metrics(q, db, r[:, :3], ks=(3,), vocabulary=VOCAB)
    assert m["normal"] == pytest.approx({3: 5 / 6})
    with pytest.raises(ValueError, match="cannot draw"):
        prior_rankings(db, 6, np.array([-1]))


def test_random_rankings_are_distinct_seeded_and_exclude():
    r = random_rankings(50, 12, 11, seed=3, exclude=np.arange(50) % 12)
    assert r.shape == (50, 11)
    assert all(len(set(row)) == 11 for row in r.tolist())
    assert not (r == (np.arange(50) % 12)[:, None]).any()
    assert (r == random_rankings(50, 12, 11, seed=3, exclude=np.arange(50) % 12)).all()


def test_cosine_rankings_and_pixel_vectors_by_hand():
    db = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])
    q = np.array([[1.0, 0.0], [0.0, 3.0]])
    # cosines: q0 (0, 1, 0.71) -> 1, 2, 0; q1 (1, 0, 0.71) -> 0, 2, 1
    assert cosine_rankings(q, db, 3).tolist() == [[1, 2, 0], [0, 2, 1]]
    assert cosine_rankings(q, db, 2, exclude=np.array([1, -1])).tolist() == [[2, 0], [0, 2]]
    v = pixel_vectors([np.array([[0.0, 1.0], [1.0, 0.0]]), np.full((2, 2), 0.3)])
    np.testing.assert_allclose(v[0], [-0.5, 0.5, 0.5, -0.5])
    np.testing.assert_array_equal(v[1], 0)  # a constant image: the zero vector
