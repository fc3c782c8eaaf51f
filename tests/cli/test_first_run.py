"""A first run that explains itself (issue 14): the preflight, plain usage errors,
progress a person can follow, and what the query, eval, log, explain and graph
commands show.  Small projects of PNG and DICOM phantoms, built with ``sync``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from app.phantoms import phantom_image, write_phantom_study
from cli.main import cli
from tests.conftest import project_config, write_project

CNN = {"cnn": {"kind": "cnn", "normalize": {"size": 32}, "embedder": {"epochs": 2, "dim": 16}}}
BOVW = {
    "bovw": {
        "kind": "bovw",
        "normalize": {"size": 64},
        "descriptors": {"n_segments": 40, "patch": 12},
        "vocabulary": {"words": 16, "sample": 2000},
    }
}


def run(root: Path | None, *args: str, code: int | None = 0) -> str:
    pre = ["-p", str(root)] if root is not None else []
    res = CliRunner().invoke(cli, [*pre, *args], catch_exceptions=False)
    if code is not None:
        assert res.exit_code == code, f"flow {' '.join(args)} -> {res.exit_code}\n{res.output}"
    return res.output


def _png(path: Path, seed: int, findings: tuple[str, ...] = ()) -> None:
    img = phantom_image(findings, size=64, rng=np.random.default_rng(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img >> 4).astype(np.uint8)).save(path, format="PNG")


def _labeled(root: Path, n: int = 8, csv: str | None = None, **config) -> Path:
    for i in range(n):
        _png(root / "images" / f"im{i}.png", i, ("Nodule",) if i % 2 else ())
    if csv is None:
        csv = "file,split,finding_labels\n" + "".join(
            f"im{i}.png,{'train' if i < n - 2 else 'val'},{'Nodule' if i % 2 else 'No Finding'}\n"
            for i in range(n)
        )
    (root / "labels.csv").write_text(csv)
    write_project(root, project_config(targets=config.pop("targets", CNN), **config))
    return root


# --------------------------------------------------------------------------
# the preflight


def test_status_reports_sources_labels_splits_and_fits(tmp_path):
    root = _labeled(tmp_path)
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "images" / ".DS_Store").write_bytes(b"x")
    out = run(root, "status")
    assert "source images" in out and "8 image file(s)" in out
    assert "1 not an image" in out and "notes.txt" in out and "1 hidden" in out
    assert "8 row(s), 8 matching a file; 8 of 8 file(s) labeled" in out
    assert "items by split: train 6, val 2" in out
    assert "fit embedder (cnn): 6 training item(s) (split(s) train)" in out
    assert "problem:" not in out


def test_files_are_recognised_by_content_not_only_by_name(tmp_path):
    """A DICOM export names its files without extensions (and has a DICOMDIR)."""
    write_phantom_study(tmp_path / "study", n=6, size=64, seed=1)
    export = tmp_path / "images"
    for i, f in enumerate(sorted((tmp_path / "study" / "images").rglob("*.dcm"))):
        (export / "PAT1").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, export / "PAT1" / f"IM{i:04d}")
    shutil.copy(next((tmp_path / "study" / "images").rglob("*.dcm")), export / "DICOMDIR")
    _png(export / "scan.1", 3)  # a PNG with a numeric suffix
    write_project(tmp_path, project_config(sources={"path": "images"}, targets=CNN))
    out = run(tmp_path, "status")
    assert "7 image file(s)" in out, out
    assert "1 a DICOMDIR" in out
    # opting out: names only
    write_project(
        tmp_path, project_config(sources={"path": "images", "by_content": False}, targets=CNN)
    )
    out = run(tmp_path, "status")
    assert "0 image file(s)" in out and "problem: source images: no image file" in out


def test_a_labels_csv_matching_no_file_is_a_problem(tmp_path):
    csv = "file,split,finding_labels\n" + "".join(
        f"other/x{i}.png,train,Nodule\n" for i in range(8)
    )
    root = _labeled(tmp_path, csv=csv)
    out = run(root, "status")
    assert "none of its 8 rows matches a file" in out and "other/x0.png" in out, out
    assert "8 file(s) have no label row" not in out  # said once, as the problem


def test_files_without_labels_and_rows_without_files_are_warned(tmp_path):
    csv = "file,split,finding_labels\nim0.png,train,Nodule\nim1.png,train,\ngone.png,train,x\n"
    root = _labeled(tmp_path, n=4, csv=csv)
    out = run(root, "status")
    assert "warning: labels" in out and "1 row(s) match no file: gone.png" in out
    assert "2 file(s) have no label row" in out and "im2.png" in out


def test_an_empty_source_folder_is_a_problem_not_a_code_error(tmp_path):
    (tmp_path / "images").mkdir()
    write_project(tmp_path, project_config(sources={"path": "images"}, targets=CNN))
    out = run(tmp_path, "status")
    assert "problem: source images: no image file" in out
    out = run(tmp_path, "build", code=1)
    assert "code error" not in out, out
    assert "ref cnn NOT moved: embedder had no items to learn from" in out
    assert "the sources hold no image files" in out


def test_a_labels_csv_without_its_split_column_is_a_usage_error(tmp_path):
    csv = "file,finding_labels\n" + "".join(f"im{i}.png,Nodule\n" for i in range(4))
    root = _labeled(tmp_path, n=4, csv=csv)
    out = run(root, "status", code=2)
    assert "no column 'split'" in out and "default_split" in out
    # a default split makes the column optional
    write_project(
        root,
        project_config(
            sources={"path": "images", "labels": "labels.csv", "default_split": "train"},
            targets=CNN,
        ),
    )
    assert "items by split: train 4" in run(root, "status")


@pytest.mark.parametrize(
    ("table", "value", "message"),
    [
        ("build", {"scheduler": "lcoal"}, "did you mean 'local'"),
        ("build", {"batch_size": 0}, "batch_size must be a positive integer"),
        ("eval", {"k": 0}, "[eval] k must be a positive integer"),
    ],
)
def test_configuration_values_are_checked_at_load(tmp_path, table, value, message):
    root = _labeled(tmp_path, n=2)
    config = project_config(targets=CNN)
    config.setdefault(table, {}).update(value)
    write_project(root, config)
    assert message in run(root, "status", code=2)


def test_a_source_value_of_the_wrong_type_is_a_usage_error(tmp_path):
    root = _labeled(tmp_path, n=2)
    write_project(
        root,
        project_config(sources={"path": "images", "extensionless": "yes"}, targets=CNN),
    )
    assert "extensionless must be true or false" in run(root, "status", code=2)


def test_the_project_is_found_from_a_subfolder(tmp_path, monkeypatch):
    root = _labeled(tmp_path, n=2)
    monkeypatch.chdir(root / "images")
    assert "2 image file(s)" in run(None, "status")
    monkeypatch.chdir(tmp_path.parent)
    out = run(None, "status", code=2)
    assert "no project file at" in out and "nor in any folder above it" in out


# --------------------------------------------------------------------------
# the command line says what it means


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = _labeled(tmp_path_factory.mktemp("built"), n=10, targets={**CNN, **BOVW})
    run(root, "build")
    return root


def test_a_no_op_build_says_so_in_one_line(built):
    out = run(built, "build")
    assert "nothing stale: 10 items, every index up to date" in out
    assert "computed" not in out and "step" not in out


@pytest.mark.parametrize(
    "args",
    [
        ["-k", "0"],
        ["-k", "-3"],
        ["--search-k", "-5"],
        ["--search-k", "0"],
    ],
)
def test_query_rejects_k_below_one(built, args):
    out = run(built, "query", str(built / "images" / "im1.png"), *args, code=2)
    assert "Invalid value" in out


def test_eval_rejects_k_below_one(built):
    assert "Invalid value" in run(built, "eval", "-k", "0", code=2)


def test_usage_errors_exit_2_missing_file_or_folder(built):
    assert "does not exist" in run(built, "query", str(built / "nope.png"), code=2)
    assert "is a directory" in run(built, "query", str(built / "images"), code=2)


def test_an_unknown_target_lists_the_valid_ones(built):
    out = run(built, "query", str(built / "images" / "im1.png"), "--target", "bovv", code=2)
    assert "no target 'bovv'" in out and "bovw, cnn" in out
    assert "flow build" not in out
    out = run(built, "log", "cnnn", code=2)
    assert "no ref named 'cnnn'" in out and "cnn" in out and "build it first" not in out


def test_query_shows_its_own_labels_and_json_paths(built, tmp_path):
    q = built / "images" / "im3.png"
    out = run(built, "query", str(q), "--target", "cnn", "-k", "3")
    assert "query images/im3.png: labels Nodule" in out  # the file: ids are keyed hashes
    doc = json.loads(run(built, "query", str(q), "--target", "cnn", "-k", "3", "--json"))
    item = doc["query_item"]
    assert (item["file"], item["labels"], len(item["id"])) == ("images/im3.png", ["Nodule"], 32)
    assert all(Path(r["path"]).is_file() for r in doc["results"])
    out = run(built, "query", str(q), "--montage", str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 0


def test_eval_prints_every_baseline_for_every_metric(built):
    write_project(
        built,
        project_config(
            targets={**CNN, **BOVW}, eval={"queries": ["val"], "database": ["train"], "k": 3}
        ),
    )
    out = run(built, "eval", "-t", "cnn")
    lines = out.splitlines()
    header = next(ln for ln in lines if ln.startswith("target"))
    assert all(m in header for m in ("AvG@3", "P@3", "mAP@3"))
    for base in ("random", "label prior"):
        row = next(ln for ln in lines if ln.strip().startswith(base))
        assert len(row.split()) >= len(base.split()) + 3, row  # a value for every metric


def test_the_graph_is_laid_out_by_graphviz_with_a_legend_and_clusters(built, tmp_path):
    out = tmp_path / "g.dot"
    run(built, "graph", str(out))
    text = out.read_text()
    assert "subgraph cluster_cnn" in text and "subgraph cluster_bovw" in text
    assert "cluster_legend" in text and "pinned fit" in text and "style=dashed" in text
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed here (.ci/graphviz.sh installs it)")
    svg = tmp_path / "g.svg"
    run(built, "graph", str(svg))
    assert "target cnn" in svg.read_text() and "legend" in svg.read_text()


def test_forget_is_named_by_explain_and_log(built):
    gone = built / "images" / "im0.png"
    run(built, "forget", str(gone))
    run(built, "build")
    out = run(built, "explain", str(gone))
    assert "withdrawn with flow forget" in out
    out = run(built, "log", "cnn")
    assert "withdrawn by flow forget: images/im0.png" in out  # the file, not its keyed id


def test_a_query_against_an_empty_index_says_so(tmp_path):
    root = _labeled(tmp_path, n=8)
    run(root, "build")
    run(root, "forget", str(root / "images"))
    run(root, "build")
    out = run(root, "query", str(root / "images" / "im1.png"), code=1)
    assert "holds no items" in out


# --------------------------------------------------------------------------
# progress


def test_a_heartbeat_line_says_how_training_goes_outside_a_terminal(tmp_path, monkeypatch):
    """Not a terminal (CliRunner): every few seconds a line with the epochs, the loss
    and the time left, from the embedder's own reports (flow.progress)."""
    import engine.progress

    monkeypatch.setattr(engine.progress, "HEARTBEAT", 0.05)
    cnn = {"cnn": {**CNN["cnn"], "embedder": {"epochs": 40, "dim": 16}}}
    root = _labeled(tmp_path, n=8, targets=cnn, scheduler="threads")
    out = run(root, "build")
    beats = [ln for ln in out.splitlines() if ln.startswith("working: ")]
    assert any("embedder:" in b and "/40 epochs" in b and "loss" in b for b in beats), out
    assert any("left" in b for b in beats)


def test_a_16_bit_png_of_the_same_values_finds_the_8_bit_image(built, tmp_path):
    """PNG carries no BitsStored: a 16-bit PNG holding 8-bit values decodes as the
    8-bit PNG does (scaled by 255, not 65535), so bovw finds the indexed image."""
    from nodes.decode import decoded

    src = built / "images" / "im5.png"
    a = np.asarray(Image.open(src))
    wide = tmp_path / "im5-16bit.png"
    Image.fromarray(a.astype(np.uint16)).save(wide)
    assert Image.open(wide).mode.startswith("I")
    np.testing.assert_array_equal(
        decoded(wide.read_bytes())["pixels"], decoded(src.read_bytes())["pixels"]
    )
    doc = json.loads(run(built, "query", str(wide), "--target", "bovw", "-k", "1", "--json"))
    assert doc["results"][0]["file"] == "images/im5.png"
    assert doc["results"][0]["distance"] < 0.01
