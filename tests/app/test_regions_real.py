"""Region-of-interest retrieval end to end from the command line on real data: NIH
chest X-rays (``../shared/data/nih-dev``) built into a regions target, queried with a
box on one of them and on a real DICOM chest radiograph (pydicom-data's RG1_UNCR,
1955 x 1841, MONOCHROME1)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.conftest import project_config, shared_data, write_project

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]


def _flow(folder, *args):
    res = CliRunner().invoke(cli, ["-p", str(folder), *args], catch_exceptions=False)
    return res


def test_regions_on_nih_dev_from_the_cli(tmp_path):
    nih = shared_data("nih-dev")
    with open(nih / "labels.csv") as f:
        rows = [r for r in csv.DictReader(f)][:60]
    (tmp_path / "images").mkdir()
    for r in rows:
        shutil.copy(nih / r["file"], tmp_path / "images")
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "split", "finding_labels"])
        for r in rows:
            w.writerow([r["file"], "train", r["finding_labels"]])
    targets = {
        "regions": {
            "kind": "regions",
            "descriptors": {"n_segments": 100, "patch": 16},
            "vocabulary": {"words": 24, "sample": 5000},
        }
    }
    write_project(tmp_path, project_config(targets=targets))
    res = _flow(tmp_path, "build", "index", "--target=all")
    assert res.exit_code == 0, res.output
    query = tmp_path / rows[0]["file"]
    res = _flow(
        tmp_path, "query", str(query), "-t", "regions", "--roi", "8,8,24,24", "--json", "-k", "5"
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert len(doc["results"]) == 5
    for h in doc["results"]:
        x, y, w, h_ = h["box"]
        assert h["size"] == [64, 64] and x + w <= 64 and y + h_ <= 64
    # a real DICOM radiograph as the query: the box is in its own 1955 x 1841 pixels
    from pydicom.data import get_testdata_file

    dcm = get_testdata_file("RG1_UNCR.dcm")
    if dcm is None:
        pytest.skip("pydicom-data's RG1_UNCR.dcm is not installed")
    res = _flow(tmp_path, "query", dcm, "-t", "regions", "--roi", "300,400,700,700", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["results"]
    res = _flow(tmp_path, "query", dcm, "-t", "regions", "--roi", "5000,5000,10,10")
    assert res.exit_code == 1 and "outside the image" in res.output
