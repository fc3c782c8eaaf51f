"""Tests of nodes.decode.

* Every file under ../shared/data/dicom and every file pydicom and pydicom-data ship
  is decoded and compared with ``decode_expectations.csv`` ("ok RxC" or the stable part
  of the ItemError reason), so a regression shows as a diff of that table.  Files are
  decoded once per content (some are shared by both collections); the ones declaring
  2 MP or more are marked ``slow``.
  Rewrite the table after an intended change with
  ``FLOW_UPDATE_DECODE_EXPECTATIONS=1 pytest tests/nodes/test_decode.py -k every_file``.
* Display rules, safety limits and PHI are checked on crafted files.
"""

from __future__ import annotations

import copy as copy_module
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)

from flow import Blob, ItemError
from nodes.decode import ATTRS, decoded, dicom_identifiers

REPO = Path(__file__).resolve().parents[2]
SHARED_DICOM = REPO / ".." / "shared" / "data" / "dicom"
EXPECTATIONS = Path(__file__).with_name("decode_expectations.csv")
SLOW_VALUES = 2_000_000  # declared rows x columns x frames x samples


def _roots() -> dict[str, Path]:
    """Where the real files live (found locally; nothing is downloaded)."""
    from pydicom.data.data_manager import DATA_ROOT, external_data_sources

    roots = {"shared": SHARED_DICOM.resolve(), "pydicom": Path(DATA_ROOT) / "test_files"}
    external = external_data_sources().get("pydicom-data")
    if external is not None:
        roots["pydicom-data"] = Path(external.data_path)
    return {k: v for k, v in roots.items() if v.is_dir()}


ROOTS = _roots()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _path(file_id: str) -> Path:
    root, _, rel = file_id.partition("/")
    if root not in ROOTS:
        pytest.skip(f"{root} files not available")
    return ROOTS[root] / rel


def _testdata(name: str) -> bytes:
    for root in ("pydicom-data", "pydicom"):
        if root in ROOTS and (ROOTS[root] / name).is_file():
            return (ROOTS[root] / name).read_bytes()
    pytest.skip(f"{name} (pydicom-data) not installed")


def _check_output(out: dict) -> np.ndarray:
    assert set(out) == {"pixels", *ATTRS}
    px = out["pixels"]
    assert isinstance(px, np.ndarray) and px.dtype == np.float32 and px.ndim == 2
    assert np.isfinite(px).all() and px.min() >= 0.0 and px.max() <= 1.0
    assert (out["rows"], out["columns"]) == px.shape
    json.dumps({k: v for k, v in out.items() if k != "pixels"})
    return px


def _stable(reason: str) -> str:
    """The part of a reason that doesn't depend on library error texts or plugins."""
    head, sep, rest = reason.partition(": ")
    return head if sep and ("Error" in rest or "Exception" in rest) else reason


_OUTCOMES: dict[bytes, str] = {}


def _outcome(path: Path) -> str:
    data = path.read_bytes()
    digest = hashlib.sha256(data).digest()
    if digest not in _OUTCOMES:
        try:
            out = decoded(data)
        except ItemError as e:
            assert isinstance(e.reason, str) and e.reason.strip()
            _OUTCOMES[digest] = "error: " + _stable(e.reason)
        else:
            px = _check_output(out)
            _OUTCOMES[digest] = f"ok {px.shape[0]}x{px.shape[1]}"
    return _OUTCOMES[digest]


def _declared_values(path: Path) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        n = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
        return n * max(1, int(ds.get("NumberOfFrames") or 1))
    except Exception:
        return 0


def _expectations() -> list[dict]:
    with EXPECTATIONS.open(newline="") as f:
        return list(csv.DictReader(f))


def _expectation_params() -> list:
    params = []
    for row in _expectations():
        marks = [pytest.mark.shared_data] if row["file"].startswith("shared/") else []
        if row["slow"] == "1":
            marks.append(pytest.mark.slow)
        params.append(pytest.param(row["file"], row["expect"], id=row["file"], marks=marks))
    return params


# --------------------------------------------------------------------------
# every real file


@pytest.mark.parametrize(("file_id", "expect"), _expectation_params())
def test_decode_matches_expectations(file_id, expect):
    path = _path(file_id)
    assert path.is_file(), f"{file_id} is listed in {EXPECTATIONS.name} but missing"
    assert _outcome(path) == expect


def test_every_file_is_in_the_expectations():
    """The table lists exactly the files present (per available collection)."""
    found = {
        f"{name}/{p.relative_to(root).as_posix()}": p
        for name, root in ROOTS.items()
        for p in _files(root)
    }
    if os.environ.get("FLOW_UPDATE_DECODE_EXPECTATIONS"):
        rows = [
            {"file": fid, "slow": int(_declared_values(p) >= SLOW_VALUES), "expect": _outcome(p)}
            for fid, p in sorted(found.items())
        ]
        with EXPECTATIONS.open("w", newline="") as f:
            w = csv.DictWriter(f, ["file", "slow", "expect"], lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
        pytest.skip(f"wrote {len(rows)} rows to {EXPECTATIONS.name}")
    listed = {r["file"] for r in _expectations() if r["file"].partition("/")[0] in ROOTS}
    assert sorted(found.keys() - listed) == [], "files not in the expectations table"
    assert sorted(listed - found.keys()) == [], "listed files that are gone"
    # the pydicom collections are exactly what pydicom's own index lists
    index = {Path(p).resolve() for p in pydicom.data.get_testdata_files() if Path(p).is_file()}
    ours = {p.resolve() for fid, p in found.items() if not fid.startswith("shared/")}
    assert index <= ours


@pytest.mark.shared_data
def test_expectations_agree_with_the_inventory():
    """INVENTORY.csv (made with pydicom + pylibjpeg) says which files decode."""
    inventory = SHARED_DICOM / "pylibjpeg" / "INVENTORY.csv"
    if not inventory.is_file():
        pytest.skip("../shared/data/dicom is absent")
    expect = {r["file"]: r["expect"] for r in _expectations()}
    with inventory.open(newline="") as f:
        for row in csv.DictReader(f):
            got = expect[f"shared/pylibjpeg/{row['path']}"]
            if row["decode"].startswith("ok"):
                assert got == f"ok {row['rows']}x{row['cols']}", row["path"]
            else:
                assert got.startswith("error: "), row["path"]


# --------------------------------------------------------------------------
# crafted DICOM


def _dicom_bytes(pixels: np.ndarray, *, photometric: str = "MONOCHROME2", **tags) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.2.1125.1"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.1"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 else 3
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _resaved(data: bytes, **tags) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for k, v in tags.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


RAMP = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30)


def test_min_max_without_voi():
    px = _check_output(decoded(_dicom_bytes(RAMP)))
    np.testing.assert_array_equal(px, (RAMP / RAMP.max()).astype(np.float32))
    flat = _check_output(decoded(_dicom_bytes(np.full((4, 4), 7, np.uint16))))
    assert (flat == 0).all()


def test_window_linear_mapping_and_fallback():
    data = _dicom_bytes(RAMP, WindowCenter=300, WindowWidth=201)
    px = decoded(data)["pixels"]
    expect = np.clip((RAMP - 299.5) / 200 + 0.5, 0, 1)  # DICOM LINEAR, C.11.2.1.2.1
    np.testing.assert_allclose(px, expect, atol=1e-6)
    assert not np.array_equal(px, decoded(data, voi=False)["pixels"])
    # a window nowhere near the data would make the image constant: min-max instead
    far = decoded(_dicom_bytes(RAMP, WindowCenter=90000, WindowWidth=10))["pixels"]
    np.testing.assert_array_equal(far, decoded(_dicom_bytes(RAMP))["pixels"])


def test_rescale_slope_intercept_is_applied_ct_small():
    data = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    hu = ds.pixel_array.astype(np.float64) - 1024.0
    windowed = _resaved(data, WindowCenter=40, WindowWidth=400)  # a window in HU
    px = _check_output(decoded(windowed))
    np.testing.assert_allclose(px, np.clip((hu - 39.5) / 399 + 0.5, 0, 1), atol=1e-6)
    shifted = decoded(_resaved(windowed, RescaleIntercept=0))["pixels"]
    assert np.abs(shifted - px).mean() > 0.1


def test_monochrome1_is_inverted_rg1():
    data = _testdata("RG1_UNCR.dcm")  # CR chest PA, MONOCHROME1
    out = decoded(data)
    px = _check_output(out)
    assert out["photometric"] == "MONOCHROME1" and out["modality"] == "CR"
    h, w = px.shape
    band = px[h // 3 : h // 2]
    mediastinum = band[:, w // 2 - 50 : w // 2 + 50].mean()
    lungs = (band[:, w // 4 - 50 : w // 4 + 50].mean(), band[:, 3 * w // 4 - 50 :][:, :100].mean())
    assert mediastinum > max(lungs) + 0.15  # lungs dark, mediastinum bright
    as_m2 = decoded(_resaved(data, PhotometricInterpretation="MONOCHROME2"))["pixels"]
    np.testing.assert_allclose(px, 1.0 - as_m2, atol=1e-6)


@pytest.mark.shared_data
def test_big_endian_ct_equals_its_little_endian_copy():
    path = SHARED_DICOM / "misc" / "kcr2019d1_anon_apct.dcm"
    if not path.is_file():
        pytest.skip("../shared/data/dicom is absent")
    data = path.read_bytes()
    out = decoded(data)
    px = _check_output(out)
    assert out["transfer_syntax"] == ExplicitVRBigEndian and px.shape == (512, 512)
    ds = pydicom.dcmread(io.BytesIO(data))
    stored = ds.pixel_array.astype("<u2")
    copy = Dataset()  # a fresh dataset may be written in the other byte order
    for elem in ds:
        if elem.keyword != "PixelData":
            copy.add(copy_module.deepcopy(elem))
    copy.file_meta = copy_module.deepcopy(ds.file_meta)
    copy.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    copy.PixelData = stored.tobytes()
    copy["PixelData"].VR = "OW"
    buf = io.BytesIO()
    copy.save_as(buf, enforce_file_format=True)
    le = decoded(buf.getvalue())
    assert le["transfer_syntax"] == ExplicitVRLittleEndian
    assert le["pixels"].tobytes() == px.tobytes()
    hu = stored * 1.0 - 1024.0  # window 60/400 HU from the header
    np.testing.assert_allclose(px, np.clip((hu - 59.5) / 399 + 0.5, 0, 1), atol=1e-6)


def test_voi_lut_sequence_is_used():
    lut = (np.sqrt(np.arange(600) / 599) * 60000 + 1000).astype(np.uint16)  # a gamma curve
    item = Dataset()
    item.LUTDescriptor = [600, 0, 16]
    item.add_new("LUTData", "US", lut.tolist())
    data = _dicom_bytes(RAMP, VOILUTSequence=[item], WindowCenter=10, WindowWidth=20)
    px = _check_output(decoded(data))  # the LUT wins over the window, as in pydicom
    np.testing.assert_allclose(px, (lut[RAMP] - 1000.0) / 60000.0, atol=1e-6)
    assert np.array_equal(decoded(data, voi=False)["pixels"], decoded(_dicom_bytes(RAMP))["pixels"])
    identity = _testdata("vlut_04.dcm")  # an identity LUT on 8-bit data: same as min-max
    np.testing.assert_array_equal(
        decoded(identity)["pixels"], decoded(identity, voi=False)["pixels"]
    )


def test_big_endian_palette_equals_little_endian():
    le = decoded(_testdata("OBXXXX1A.dcm"))["pixels"]
    be = decoded(_testdata("OBXXXX1A_expb.dcm"))["pixels"]
    assert le.max() > 0.9 and np.array_equal(le, be)


def test_multiframe_rules():
    data = _testdata("emri_small.dcm")  # 10 frames, 64x64
    ds = pydicom.dcmread(io.BytesIO(data))
    stack = ds.pixel_array.astype(np.float64)
    assert stack.shape == (10, 64, 64) and "WindowCenter" not in ds

    def mm(a):
        return (a - a.min()) / (a.max() - a.min())

    first, middle = decoded(data, frame="first"), decoded(data)
    assert first["frames"] == 10
    np.testing.assert_allclose(first["pixels"], mm(stack[0]), atol=1e-6)
    np.testing.assert_allclose(middle["pixels"], mm(stack[5]), atol=1e-6)
    mean = decoded(data, frame="mean")["pixels"]
    np.testing.assert_allclose(mean, mm(stack).mean(axis=0), atol=1e-6)
    limit = 64 * 64 * 5  # one frame fits; the whole stack does not
    assert decoded(data, max_pixels=limit)["pixels"].shape == (64, 64)
    with pytest.raises(ItemError, match="image too large"):
        decoded(data, frame="mean", max_pixels=limit)
    with pytest.raises(ValueError):
        decoded(data, frame="last")


def test_rgb_and_ybr_dicom_to_luma():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[1:, :, 1], rgb[2:, 2:, 2] = 255, 128, 64
    px = decoded(_dicom_bytes(rgb, photometric="RGB"))["pixels"]
    expect = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255
    np.testing.assert_allclose(px, expect, atol=1e-6)
    for name in ("SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        other = decoded(_testdata(name))["pixels"]  # the same picture, three encodings
        assert other.shape == (100, 100)
        if name == "SC_rgb.dcm":
            ref = other
        assert np.abs(other - ref).mean() < 0.02, name


def test_dicom_without_preamble_or_file_meta():
    data = _dicom_bytes(RAMP, WindowCenter=300, WindowWidth=201)
    ref = decoded(data)["pixels"]
    for form in (Blob(data), memoryview(data), bytearray(data)):  # other byte containers
        assert np.array_equal(decoded(form)["pixels"], ref)
    assert np.array_equal(decoded(data[128:])["pixels"], ref)  # "DICM" first
    ds = pydicom.dcmread(io.BytesIO(data))
    raw = Dataset()
    raw.update(ds)
    buf = io.BytesIO()
    raw.save_as(buf, implicit_vr=True, little_endian=True)  # a bare dataset
    assert buf.getvalue()[:2] == b"\x08\x00"
    assert np.array_equal(decoded(buf.getvalue())["pixels"], ref)


def test_phi_never_leaves_the_node():
    phi = {
        "PatientName": "Doe^Janet",
        "PatientID": "PID-987654",
        "PatientBirthDate": "19580214",
        "AccessionNumber": "ACC-55511",
        "StudyInstanceUID": "1.2.826.0.1.3680043.2.1125.777",
        "SeriesInstanceUID": "1.2.826.0.1.3680043.2.1125.778",
        "InstitutionName": "St Elsewhere",
        "ReferringPhysicianName": "House^Greg",
    }
    data = _dicom_bytes(RAMP, ViewPosition="PA", BodyPartExamined="CHEST", **phi)
    out = decoded(data, study_salt="site-salt")
    assert set(out) == {"pixels", *ATTRS}
    text = " ".join(repr(v) for k, v in out.items() if k != "pixels")
    for secret in [*phi.values(), "1.2.826.0.1.3680043.2.1125.1", "Doe", "987654", "1958"]:
        assert secret not in text
    assert (out["view_position"], out["body_part"]) == ("PA", "CHEST")
    assert re.fullmatch(r"[0-9a-f]{32}", out["study"])
    assert decoded(data, study_salt="other")["study"] != out["study"]
    assert decoded(_dicom_bytes(RAMP))["study"] == ""


def test_dicom_identifiers(tmp_path):
    data = _dicom_bytes(
        RAMP,
        StudyInstanceUID="1.2.3.10",
        SeriesInstanceUID="1.2.3.11",
        AccessionNumber="A77",
    )
    expect = {
        "SOPInstanceUID": "1.2.826.0.1.3680043.2.1125.1",
        "StudyInstanceUID": "1.2.3.10",
        "SeriesInstanceUID": "1.2.3.11",
        "AccessionNumber": "A77",
    }
    assert dicom_identifiers(data) == expect
    (tmp_path / "a.dcm").write_bytes(data)
    assert dicom_identifiers(tmp_path / "a.dcm") == expect
    assert dicom_identifiers(_dicom_bytes(RAMP))["AccessionNumber"] == ""
    with pytest.raises(ItemError):
        dicom_identifiers(b"\x89PNG\r\n\x1a\n")


# --------------------------------------------------------------------------
# PNG / JPEG


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


RNG = np.random.default_rng(7)
RGB8 = RNG.integers(0, 256, (12, 9, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (12, 9), dtype=np.uint8)


def _luma(rgb):
    return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0


def _palette_image() -> tuple[Image.Image, np.ndarray]:
    index = (RGB8[..., 0] % 4).astype(np.uint8)
    im = Image.frombytes("P", (index.shape[1], index.shape[0]), index.tobytes())
    colors = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [10, 20, 250]], np.uint8)
    im.putpalette(colors.ravel().tolist())
    return im, _luma(colors[RGB8[..., 0] % 4].astype(np.float64))


@pytest.mark.parametrize("case", ["L", "I;16", "RGB", "RGBA", "LA", "P", "P+transparency", "1"])
def test_png_modes(case):
    gray8 = RGB8[..., 0]
    if case == "L":
        im, expect = Image.fromarray(gray8), gray8 / 255.0
    elif case == "I;16":
        g16 = (gray8.astype(np.uint16) * 257 + 3).astype(np.uint16)
        im, expect = Image.fromarray(g16), g16 / 65535.0
    elif case == "RGB":
        im, expect = Image.fromarray(RGB8), _luma(RGB8.astype(np.float64))
    elif case == "RGBA":
        im = Image.fromarray(np.dstack([RGB8, ALPHA]))
        expect = _luma(RGB8.astype(np.float64)) * ALPHA / 255.0  # composited on black
    elif case == "LA":
        im = Image.fromarray(np.dstack([gray8, ALPHA])).convert("LA")
        expect = gray8 / 255.0 * ALPHA / 255.0
    elif case == "P":
        im, expect = _palette_image()
    elif case == "P+transparency":
        im, expect = _palette_image()  # saved with palette entry 1 (red) transparent
        expect = np.where(RGB8[..., 0] % 4 == 1, 0.0, expect)
    else:
        bits = gray8 > 127
        im, expect = Image.fromarray(bits), bits.astype(np.float64)
    data = _png(im, transparency=1) if case == "P+transparency" else _png(im)
    out = decoded(data)
    px = _check_output(out)
    assert out["format"] == "png" and out["transfer_syntax"] == "" and out["study"] == ""
    np.testing.assert_allclose(px, expect, atol=1e-6)


def test_jpeg_gray_rgb_and_exif_orientation():
    ramp = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (30, 1))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "JPEG", quality=95)
    out = decoded(buf.getvalue())
    assert out["format"] == "jpeg" and out["pixels"].shape == (30, 40)
    np.testing.assert_allclose(out["pixels"], ramp / 255.0, atol=0.03)
    buf = io.BytesIO()
    Image.fromarray(np.dstack([ramp] * 3)).save(buf, "JPEG", quality=95)
    np.testing.assert_allclose(decoded(buf.getvalue())["pixels"], ramp / 255.0, atol=0.03)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "JPEG", quality=95, exif=exif)
    out = decoded(buf.getvalue())
    assert out["pixels"].shape == (40, 30) and (out["rows"], out["columns"]) == (40, 30)
    np.testing.assert_allclose(out["pixels"], np.rot90(ramp, -1) / 255.0, atol=0.03)


# --------------------------------------------------------------------------
# bad input and limits


def _bad_inputs() -> dict[str, bytes]:
    png = _png(Image.fromarray(RGB8))
    buf = io.BytesIO()
    Image.fromarray(RGB8).save(buf, "JPEG")
    jpeg, dcm = buf.getvalue(), _dicom_bytes(RAMP)
    return {
        "empty": b"",
        "text": b"hello, world\n" * 20,
        "random": RNG.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "png-truncated": png[: len(png) // 2],
        "png-magic-then-junk": png[:8] + b"\x00" * 100,
        "jpeg-truncated": jpeg[: len(jpeg) // 2],
        "jpeg-magic-then-junk": jpeg[:3] + b"\x01" * 100,
        "dicom-truncated-pixels": dcm[:-300],
        "dicom-preamble-then-junk": b"\x00" * 128 + b"DICM" + b"\xff" * 60,
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
def test_bad_bytes_raise_item_error(name):
    with pytest.raises(ItemError) as err:
        decoded(_bad_inputs()[name])
    assert err.value.reason.strip()
    if name == "dicom-truncated-pixels":
        assert err.value.reason == "truncated pixel data: expected 1200 bytes, found 900"


NON_IMAGE = [("rtplan.dcm", "RT Plan Storage"), ("test-SR.dcm", "Comprehensive SR Storage")]


@pytest.mark.parametrize(("name", "sop"), NON_IMAGE)
def test_non_image_dicom(name, sop):
    with pytest.raises(ItemError, match=f"DICOM has no pixel data \\(SOP class {sop}\\)"):
        decoded(_testdata(name))


def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


def test_huge_dicom_header_is_rejected_before_allocating():
    data = _dicom_bytes(np.zeros((2, 2), np.uint16), Rows=60000, Columns=60000)
    err = []

    def run():
        with pytest.raises(ItemError, match=r"image too large: 60000x60000 .*3,600,000,000") as e:
            decoded(data)
        err.append(e.value.reason)

    assert _peak_mib(run) < 16
    assert "max_pixels=64,000,000" in err[0]


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_huge_png_header_is_rejected_before_allocating():
    # over max_pixels and over Pillow's warning threshold, under its hard limit
    png = _png_header(10000, 10000)

    def run():
        with pytest.raises(ItemError):
            decoded(png)

    assert _peak_mib(run) < 16
    with pytest.raises(ItemError, match=r"image too large: 10000x10000"):
        decoded(png)
    # over Pillow's own hard limit even when max_pixels would allow it
    with pytest.raises(ItemError, match="too large"):
        decoded(_png_header(100000, 100000), max_pixels=10**11)


def test_codestream_larger_than_header_is_rejected():
    smooth = np.add.outer(np.arange(12) * 12, np.arange(9) * 10).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, "JPEG", quality=95)  # a 12x9 codestream

    def wrapped(rows: int, cols: int) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(_dicom_bytes(np.zeros((rows, cols), np.uint8))))
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
        out = io.BytesIO()
        ds.save_as(out)
        return out.getvalue()

    expect = (smooth - smooth.min()) / (smooth.max() - smooth.min())  # min-max, no window
    np.testing.assert_allclose(decoded(wrapped(12, 9))["pixels"], expect, atol=0.05)
    with pytest.raises(ItemError, match=r"compressed frame is 12x9x1 .* header says 4x3x1"):
        decoded(wrapped(4, 3))


def _mutations(data: bytes, rng: np.random.Generator, n: int):
    for i in range(n):
        b = bytearray(data)
        if i % 3 == 0:  # scattered byte flips
            for p in rng.integers(0, len(b), size=rng.integers(1, 20)):
                b[p] = rng.integers(0, 256)
        elif i % 3 == 1:  # truncation
            b = b[: rng.integers(1, len(b))]
        else:  # flips in the header region
            for p in rng.integers(0, min(len(b), 1200), size=rng.integers(1, 8)):
                b[p] = rng.integers(0, 256)
        yield bytes(b)


def test_corrupted_files_fail_only_as_item_errors():
    """Seeded corruptions of small files in several codecs: a valid image or ItemError.

    (Found this way: pylibjpeg-rle panics with a BaseException, GDCM aborts the
    process on some corrupt JPEG streams -- hence ``_EXCLUDED_PLUGINS``.)
    """
    buf = io.BytesIO()
    Image.fromarray(RGB8).save(buf, "JPEG")
    seeds = [_png(Image.fromarray(RGB8)), buf.getvalue()]
    for name in (
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "OBXXXX1A_rle.dcm",
        "MR_small_jp2klossless.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "JPEG-LL.dcm",
    ):
        seeds.append(_testdata(name))
    rng = np.random.default_rng(2024)
    outcomes = {"ok": 0, "item": 0}
    for data in seeds:
        for bad in _mutations(data, rng, 30):
            try:
                _check_output(decoded(bad))
                outcomes["ok"] += 1
            except ItemError as e:
                assert e.reason.strip()
                outcomes["item"] += 1
    assert outcomes["ok"] > 20 and outcomes["item"] > 20


# --------------------------------------------------------------------------
# determinism


def test_deterministic_in_process_and_across_processes(tmp_path):
    names = [
        "CT_small.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "OBXXXX1A_rle.dcm",
        "MR_small_jp2klossless.dcm",
    ]
    blobs = [_testdata(n) for n in names] + [_png(Image.fromarray(np.dstack([RGB8, ALPHA])))]
    here = []
    for data in blobs:
        a, b = decoded(data)["pixels"], decoded(data)["pixels"]
        assert a.tobytes() == b.tobytes()
        here.append(hashlib.sha256(a.tobytes()).hexdigest())
    script = (
        "import sys, hashlib, json; from nodes.decode import decoded\n"
        "blobs = [open(p, 'rb').read() for p in json.loads(sys.argv[1])]\n"
        "print(json.dumps([hashlib.sha256(decoded(b)['pixels'].tobytes()).hexdigest()"
        " for b in blobs]))\n"
    )
    paths = []
    for i, data in enumerate(blobs):
        (tmp_path / str(i)).write_bytes(data)
        paths.append(str(tmp_path / str(i)))
    res = subprocess.run(
        [sys.executable, "-c", script, json.dumps(paths)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "3"},
    )
    assert json.loads(res.stdout.strip().splitlines()[-1]) == here
