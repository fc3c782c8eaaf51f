"""flow eval's report: metrics of a target beside the baselines, warnings, tables.

The metric functions themselves are tested on hand-made cases in
tests/nodes/test_metrics.py; here, what the evaluation makes of them.
"""

from __future__ import annotations

import numpy as np
import pytest

from app.evaluation import _warnings, evaluate_targets, label_table, plot_metrics, report_table
from tests.conftest import project_config, write_project


def _curves(v: float, k: int = 3) -> dict:
    return {m: {K: v for K in range(1, k + 1)} for m in
            ("avg", "precision", "map", "label_macro", "abnormal", "normal")}  # fmt: skip


def _result(target: str, ours: float, pixels: float) -> dict:
    return {
        "target": target,
        "kind": "cnn",
        "k": 3,
        "queries": 10,
        "database": 40,
        "metrics": _curves(ours),
        "random": _curves(0.1),
        "prior": _curves(0.2),
        "pixels": _curves(pixels),
        "per_label": {
            "No Finding": {"queries": 6, target: 0.5, "random": 0.4, "prior": 1.0, "pixels": 0.6},
            "Nodule": {"queries": 4, target: 0.3, "random": 0.1, "prior": 0.0, "pixels": 0.2},
            "Mass": {"queries": 0, target: None, "random": None, "prior": None, "pixels": None},
        },
    }


def test_a_target_that_does_not_beat_raw_pixels_is_warned_about():
    assert _warnings(_result("good", 0.31, 0.30), 3) == []
    (w,) = _warnings(_result("bad", 0.30, 0.30), 3)  # a tie is not beating them
    assert "bad does not beat raw pixels on label-macro P@3 (0.300 vs 0.300)" in w
    no_pixels = _result("x", 0.1, 0.5)
    del no_pixels["pixels"]
    assert _warnings(no_pixels, 3) == []


def test_report_and_label_tables():
    results = [_result("cnn", 0.4, 0.3), _result("bovw", 0.2, 0.3)]
    headers, rows = report_table(results, 3)
    assert headers[:2] == ["target", "ranking"]
    assert "label-macro P@3" in headers and "abnormal P@3" in headers and "normal P@3" in headers
    names = [r[1].strip() for r in rows]
    base = ["random", "label prior", "raw pixels"]
    assert names == ["cnn (cnn)", *base, "bovw (cnn)", *base]
    assert rows[0][2:] == [0.4] * 6 and rows[3][2:] == [0.3] * 6
    headers, rows = label_table(results[0])
    assert headers == ["label", "queries", "cnn P@3", "random P@3", "label prior P@3",
                       "raw pixels P@3"]  # fmt: skip
    assert [r[0] for r in rows] == ["No Finding", "Nodule"]  # most queries first; none: left out
    assert rows[1] == ["Nodule", 4, 0.3, 0.1, 0.0, 0.2]


def test_the_plot_has_a_panel_per_metric(tmp_path):
    path = tmp_path / "eval.png"
    plot_metrics([_result("cnn", 0.4, 0.3), _result("bovw", 0.2, 0.3)], path)
    from PIL import Image

    w, h = Image.open(path).size
    assert w > 1200 and h > 800  # two rows of three panels


@pytest.mark.slow
def test_a_deliberately_bad_target_is_flagged_against_raw_pixels(tmp_path):
    """A bag of visual words with one word gives every image the same histogram: its
    ranking says nothing about the image, and the evaluation says so."""
    from app.phantoms import write_phantom_study
    from app.workspace import Workspace

    write_phantom_study(tmp_path, n=80, size=64, seed=3)
    bad = {
        "kind": "bovw",
        "normalize": {"size": 64},
        "descriptors": {"n_segments": 40, "patch": 12},
        "vocabulary": {"words": 1, "sample": 2000},
    }
    write_project(tmp_path, project_config(targets={"onewords": bad}))
    (result,) = evaluate_targets(Workspace.open(tmp_path), "all", 5)
    assert result["warnings"], result["metrics"]["label_macro"]
    assert "onewords does not beat raw pixels on label-macro P@5" in result["warnings"][0]
    pixels = result["pixels"]
    assert pixels["label_macro"][5] > result["random"]["label_macro"][5]  # pixels see something
    assert np.isclose(result["prior"]["normal"][5], 1.0)
