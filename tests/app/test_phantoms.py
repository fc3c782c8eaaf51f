"""The demo study generator: realistic-enough phantoms, valid DICOM, deterministic bytes."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, UnidentifiedImageError
from pydicom import uid
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_encoder
from scipy.ndimage import binary_erosion, gaussian_filter
from skimage.measure import label

from app.phantoms import (
    FINDINGS,
    phantom_identifiers,
    phantom_image,
    write_bad_files,
    write_phantom_study,
)
from nodes.metrics import label_matrix, random_rankings, retrieval_metrics

REPO = Path(__file__).resolve().parents[2]
NATIVE = {
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
}
ENCODED = {uid.RLELossless, uid.JPEGLSLossless, uid.JPEG2000Lossless}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """The default demo study (160 files of 128 x 128)."""
    folder = tmp_path_factory.mktemp("study")
    assert write_phantom_study(folder) == folder / "labels.csv"
    return folder


@pytest.fixture(scope="module")
def rows(study) -> list[dict[str, str]]:
    with open(study / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def datasets(study, rows) -> dict[str, pydicom.Dataset]:
    return {r["file"]: pydicom.dcmread(study / r["file"]) for r in rows}


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _box(a: np.ndarray, r0: float, r1: float, c0: float, c1: float) -> np.ndarray:
    n, m = a.shape
    return a[int(r0 * n) : int(r1 * n), int(c0 * m) : int(c1 * m)]


# --------------------------------------------------------------------------
# phantom_image


def test_phantom_image_is_12_bit_uint16_and_seeded():
    a = phantom_image(("Nodule",), size=96, rng=np.random.default_rng(4))
    assert a.shape == (96, 96) and a.dtype == np.uint16
    assert a.max() <= 4095 and a.min() >= 0 and a.std() > 300
    assert np.array_equal(a, phantom_image(("Nodule",), size=96, rng=np.random.default_rng(4)))
    assert not np.array_equal(a, phantom_image(("Nodule",), size=96, rng=np.random.default_rng(5)))
    same_patient = phantom_image(("No Finding",), size=96, rng=np.random.default_rng(4))
    assert np.array_equal(same_patient, phantom_image((), size=96, rng=np.random.default_rng(4)))
    with pytest.raises(ValueError, match="unknown findings"):
        phantom_image(("Fracture",), rng=np.random.default_rng(0))


def test_normal_anatomy_lungs_darker_than_heart_and_tissue():
    for k in range(10):
        a = phantom_image((), size=128, rng=np.random.default_rng(k)).astype(float)
        lung = np.median(_box(a, 0.3, 0.45, 0.2, 0.28))
        heart = np.median(_box(a, 0.6, 0.66, 0.5, 0.56))
        belly = np.median(_box(a, 0.88, 0.95, 0.4, 0.6))
        air = np.median(_box(a, 0.0, 0.05, 0.0, 0.05))
        assert air < lung < heart and lung < belly, (k, air, lung, heart, belly)


def _pairs(finding: str, n: int = 12, size: int = 128):
    """(with finding - without finding) on the same patient, pose and noise."""
    for k in range(n):
        base = phantom_image((), size=size, rng=np.random.default_rng([11, k])).astype(float)
        sick = phantom_image((finding,), size=size, rng=np.random.default_rng([11, k]))
        yield base, sick.astype(float) - base


def _centroid_row(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[0].mean() / mask.shape[0])


def test_cardiomegaly_widens_the_heart():
    def heart_width(a):
        profile = _box(a, 0.57, 0.68, 0.15, 0.85).mean(axis=0)
        lung, heart = (
            np.median(_box(a, 0.3, 0.45, 0.2, 0.28)),
            np.median(_box(a, 0.6, 0.66, 0.5, 0.56)),
        )
        return (profile > (lung + heart) / 2).sum()

    widths = []
    for base, diff in _pairs("Cardiomegaly"):
        brighter = diff > 150
        assert 0.015 < brighter.mean() < 0.15 and 0.45 < _centroid_row(brighter) < 0.8
        widths.append((heart_width(base), heart_width(base + diff)))
    normal, enlarged = np.array(widths).T
    assert enlarged.mean() > 1.25 * normal.mean()


def test_effusion_whitens_the_lower_lung():
    for _base, diff in _pairs("Effusion"):
        brighter = diff > 150
        assert brighter.mean() > 0.02 and _centroid_row(brighter) > 0.55
        lower = max(
            _box(diff, 0.62, 0.72, 0.18, 0.3).mean(), _box(diff, 0.62, 0.72, 0.7, 0.82).mean()
        )
        assert lower > 300 and _box(diff, 0.15, 0.3, 0, 1).mean() < 20


def test_pneumothorax_darkens_a_lateral_upper_rim_without_markings():
    for _base, diff in _pairs("Pneumothorax"):
        darker = diff < -150
        assert darker.mean() > 0.03 and _centroid_row(darker) < 0.55
        assert darker.sum() > 10 * (diff > 150).sum()  # only the thin pleural line is brighter
        assert abs(np.nonzero(darker)[1].mean() / diff.shape[1] - 0.5) > 0.18  # one side
        # vessel markings and lung texture are gone from the rim: the difference is not
        # just a smooth darkening there (noise, pose and ribs cancel in a same-patient pair)
        rim = binary_erosion(diff < -300, iterations=3)
        assert (diff - gaussian_filter(diff, 2))[rim].std() > 20


def test_nodule_is_one_small_round_opacity():
    for _base, diff in _pairs("Nodule"):
        blob = diff > 150
        assert 0.001 < blob.mean() < 0.02 and diff.max() > 500
        assert label(blob).max() == 1


def test_infiltration_adds_patchy_opacity():
    for _base, diff in _pairs("Infiltration"):
        patchy = diff > 100
        assert 0.01 < patchy.mean() < 0.15 and diff.max() > 350 and diff.min() > -50


# --------------------------------------------------------------------------
# the study folder


def test_write_is_deterministic_in_and_across_processes(tmp_path):
    write_phantom_study(tmp_path / "a", n=24, seed=3)
    write_phantom_study(tmp_path / "b", n=24, seed=3)
    write_phantom_study(tmp_path / "c", n=24, seed=4)
    code = (
        "import sys; from app.phantoms import write_phantom_study as w;w(sys.argv[1], n=24, seed=3)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], check=True, cwd=REPO)
    a = _files(tmp_path / "a")
    assert len(a) == 25
    assert a == _files(tmp_path / "b") == _files(tmp_path / "d")
    c = _files(tmp_path / "c")
    assert a.keys() != c.keys() or all(a[k] != c[k] for k in a if k.endswith(".dcm"))


def test_write_rejects_bad_arguments(tmp_path):
    for bad in ({"n": 0}, {"size": 16}, {"val_fraction": 1.5}):
        with pytest.raises(ValueError, match="need n >= 1"):
            write_phantom_study(tmp_path, **bad)
    assert not any(tmp_path.iterdir())


def test_labels_csv(study, rows):
    text = (study / "labels.csv").read_text()
    assert text.startswith("file,split,finding_labels\n") and "\r" not in text
    assert len(rows) == 160 and [r["file"] for r in rows] == sorted(r["file"] for r in rows)
    assert {r["split"] for r in rows} == {"train", "val"}
    assert 0.18 < sum(r["split"] == "val" for r in rows) / len(rows) < 0.35
    for r in rows:
        assert re.fullmatch(r"images/P\d{4}/S\d{2}/IM\d{4}\.dcm", r["file"]), r["file"]
        assert (study / r["file"]).is_file()
        labels = r["finding_labels"].split("|")
        assert labels == sorted(set(labels)) and set(labels) <= {*FINDINGS, "No Finding"}
        assert labels == ["No Finding"] or "No Finding" not in labels
    splits_of = {}
    for r in rows:  # split by patient
        splits_of.setdefault(r["file"].split("/")[1], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    counts = Counter(lab for r in rows for lab in r["finding_labels"].split("|"))
    assert 0.35 <= counts["No Finding"] / len(rows) <= 0.45
    assert all(counts[f] >= 15 for f in FINDINGS), counts
    assert sum("|" in r["finding_labels"] for r in rows) >= 10  # multi-label present


def test_every_file_is_a_valid_cr_or_dx_image(study, datasets):
    syntaxes = Counter()
    for name, ds in datasets.items():
        ts = ds.file_meta.TransferSyntaxUID
        syntaxes[ts] += 1
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert (ds.Modality, ds.SOPClassUID) in {
            ("CR", uid.ComputedRadiographyImageStorage),
            ("DX", uid.DigitalXRayImageStorageForPresentation),
        }
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (
            16,
            12,
            11,
            0,
        )
        assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition in {"PA", "AP"}
        assert ds.PhotometricInterpretation in {"MONOCHROME1", "MONOCHROME2"}
        assert ts.is_compressed == (ts in ENCODED)
        pixels = ds.pixel_array
        assert pixels.shape == (128, 128) and pixels.dtype == np.uint16, name
        assert pixels.max() <= 4095
        if ds.Modality == "DX":
            assert "RescaleSlope" in ds and "WindowCenter" in ds
    writable = NATIVE | {ts for ts in ENCODED if get_encoder(ts).is_available}
    assert set(syntaxes) == writable, syntaxes
    assert syntaxes[uid.ExplicitVRLittleEndian] > len(datasets) / 2
    assert {uid.RLELossless, uid.JPEGLSLossless, uid.JPEG2000Lossless} <= writable  # here, all six
    frac = Counter(ds.PhotometricInterpretation for ds in datasets.values())["MONOCHROME1"] / 160
    assert 0.1 <= frac <= 0.2
    for attr in ("RescaleSlope", "WindowCenter"):
        has = sum(attr in ds for ds in datasets.values())
        assert 0 < has < len(datasets), attr
    assert any(float(ds.get("RescaleSlope", 1)) != 1 for ds in datasets.values())
    assert any(ds.get("WindowCenter") and ds["WindowCenter"].VM == 2 for ds in datasets.values())
    assert len({ds.StudyInstanceUID for ds in datasets.values()}) < len(
        datasets
    )  # multi-image studies
    assert len({ds.SOPInstanceUID for ds in datasets.values()}) == len(datasets)


def test_monochrome1_files_store_inverted_values(datasets):
    seen = Counter()
    for name, ds in datasets.items():
        values = apply_modality_lut(ds.pixel_array, ds).astype(float)
        lungs = np.concatenate(
            [_box(values, 0.3, 0.45, 0.2, 0.28), _box(values, 0.3, 0.45, 0.72, 0.8)]
        )
        heart = _box(values, 0.6, 0.66, 0.5, 0.56)
        lungs_brighter = np.median(lungs) > np.median(heart) + 300
        heart_brighter = np.median(heart) > np.median(lungs) + 300
        mono1 = ds.PhotometricInterpretation == "MONOCHROME1"
        assert lungs_brighter if mono1 else heart_brighter, name
        seen[mono1] += 1
    assert seen[True] and seen[False]


def test_identifiers_are_listed_and_really_in_the_files(study, datasets):
    ids = phantom_identifiers(study)
    assert set(ids) == {"PatientName", "PatientID", "AccessionNumber", "PatientBirthDate"}
    patients = {name.split("/")[1] for name in datasets}
    assert len(ids["PatientID"]) == len(ids["PatientName"]) == len(patients)
    assert all(re.fullmatch(r"PHX\d{7}", v) for v in ids["PatientID"])
    assert all(re.fullmatch(r"[A-Z]+\^[A-Z]+\^\d{4}", v) for v in ids["PatientName"])
    assert all(re.fullmatch(r"(19|20)\d{6}", v) for v in ids["PatientBirthDate"])
    assert len(ids["AccessionNumber"]) == len({ds.StudyInstanceUID for ds in datasets.values()})
    for name, ds in datasets.items():
        raw = (study / name).read_bytes()
        if ds.file_meta.TransferSyntaxUID == uid.DeflatedExplicitVRLittleEndian:
            start = 144 + int.from_bytes(raw[140:144], "little")  # after the file meta group
            raw = zlib.decompress(raw[start:], -15)
        for tag in ids:
            value = str(ds[tag].value)
            assert value in ids[tag] and value.encode() in raw, (name, tag)


def test_bad_files(tmp_path):
    truncated, text, report, empty = write_bad_files(tmp_path / "one")
    assert [p.name for p in (truncated, text, report, empty)] == [
        "truncated.dcm",
        "not_dicom.dcm",
        "report_sr.dcm",
        "empty.png",
    ]
    header = pydicom.dcmread(truncated)
    assert header.Modality == "CR"
    with pytest.raises(ValueError):
        _ = header.pixel_array
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(text)
    sr = pydicom.dcmread(report)
    assert sr.Modality == "SR" and "PixelData" not in sr
    assert empty.stat().st_size == 0
    with pytest.raises(UnidentifiedImageError):
        Image.open(empty)
    write_bad_files(tmp_path / "two")
    assert _files(tmp_path / "one") == _files(tmp_path / "two")  # deterministic too
    assert "ROE^BROKEN^9999" in phantom_identifiers(tmp_path / "one")["PatientName"]


# --------------------------------------------------------------------------
# learnable, but not trivially


def test_raw_pixel_knn_beats_random_but_is_far_from_perfect():
    rng = np.random.default_rng(0)
    pool = [("No Finding",)] * 4 + [(f,) for f in FINDINGS] + [("Cardiomegaly", "Effusion")]
    labels = [pool[i] for i in rng.integers(len(pool), size=200)]
    x = np.stack(
        [
            phantom_image(fs, size=64, rng=np.random.default_rng([1, i])).ravel()
            for i, fs in enumerate(labels)
        ]
    ).astype(float)
    x -= x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    ranking = np.argsort(-sim, axis=1, kind="stable")[:, :10]
    matrix, _ = label_matrix(labels)
    knn = retrieval_metrics(matrix, matrix, ranking, ks=(10,))["avg"][10]
    chance = retrieval_metrics(
        matrix, matrix, random_rankings(200, 200, 10, exclude=np.arange(200)), ks=(10,)
    )["avg"][10]
    assert knn > chance + 0.05 and knn < 0.8, (knn, chance)
