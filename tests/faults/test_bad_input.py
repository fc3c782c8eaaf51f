"""Bad and malicious input: what a hostile or broken file can and cannot do.

* ``decoded`` fuzzed with Hypothesis (deterministic: ``derandomize=True``, no example
  database) over real DICOM (../shared/data/dicom, else pydicom's and pydicom-data's test
  files), phantom DICOMs in every transfer syntax this installation writes, and PNG/JPEG
  made with Pillow: bit flips, byte runs, truncations, insertions, and structured edits
  of the size fields (DICOM Rows/Columns/BitsAllocated/SamplesPerPixel/NumberOfFrames/
  pixel data length, PNG IHDR with a valid CRC, JPEG SOF).  Every example must give a
  float32 2-D image in [0, 1] or an ItemError with a reason -- never another exception,
  never a hang (a per-example ``setitimer`` alarm, and the batch runs in a subprocess
  under a wall-clock limit), with peak RSS measured around the batch.
* Huge declared sizes and zero-size images are refused before any pixel buffer exists.
* Weights files are never unpickled into code; nothing in the code base unpickles; a
  crafted cache or zarr metadata that asks for pickle is not honoured; an ONNX file that
  pulls in external data is refused.
* Source file names (``..``-like, newline, unicode, invalid UTF-8, 255 bytes) are ids,
  never store paths: a build over them writes nothing outside the store root.

The fuzz batch is this file run as a script (``python test_bad_input.py fuzz CONFIG``).
"""

from __future__ import annotations

import ast
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DICOM = REPO / ".." / "shared" / "data" / "dicom"
CHILD_TIMEOUT = 170.0  # seconds for a whole fuzz batch in its subprocess
EXAMPLE_LIMIT = 10.0  # seconds for one decode before it counts as a hang
FUZZ_EXAMPLES = 1500
FUZZ_MAX_PIXELS = 4_000_000  # the fuzz's max_pixels: bounds what one example may allocate

# small real files (declared <= 300k values), found in ../shared/data/dicom first, then in
# pydicom's and pydicom-data's test files: one or more per transfer syntax family
SEED_NAMES = (
    "CT_small.dcm",  # explicit VR LE, 16-bit, rescale
    "MR_small.dcm",
    "SC_rgb.dcm",
    "SC_rgb_2frame.dcm",
    "rtdose_1frame.dcm",  # implicit VR LE, 32-bit
    "MR_small_RLE.dcm",
    "SC_rgb_rle_16bit_2frame.dcm",
    "JPEGBaseline_1s_1f_u_08_08.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_small_odd_jpeg.dcm",
    "JPEG-lossy.dcm",  # JPEG extended, 12-bit
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",
    "693_J2KI.dcm",
    "MR_small_jp2klossless.dcm",
    "SC_rgb_gdcm_KY.dcm",
)


# --------------------------------------------------------------------------
# the seed corpus


def _dicom_roots() -> list[Path]:
    roots = [SHARED_DICOM.resolve()]
    try:
        from pydicom.data.data_manager import DATA_ROOT, external_data_sources

        roots.append(Path(DATA_ROOT) / "test_files")
        external = external_data_sources().get("pydicom-data")
        if external is not None:
            roots.append(Path(external.data_path))
    except ImportError:
        pass
    return [r for r in roots if r.is_dir()]


def _real_dicoms() -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for root in _dicom_roots():
        for p in sorted(root.rglob("*.dcm")):
            if p.name in SEED_NAMES and p.name not in found and p.stat().st_size < 200_000:
                found[p.name] = p.read_bytes()
    return found


def _pillow_images() -> dict[str, bytes]:
    from PIL import Image

    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:24, 0:20]
    gray = ((yy * 9 + xx * 5) % 256).astype(np.uint8)
    rgb = np.dstack([gray, gray[::-1], rng.integers(0, 256, gray.shape, dtype=np.uint8)])
    out = {}
    for name, im, fmt in (
        ("gray.png", Image.fromarray(gray), "PNG"),
        ("gray16.png", Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
        ("rgba.png", Image.fromarray(np.dstack([rgb, gray])), "PNG"),
        ("palette.png", Image.fromarray(rgb).convert("P"), "PNG"),
        ("gray.jpg", Image.fromarray(gray), "JPEG"),
        ("rgb.jpg", Image.fromarray(rgb), "JPEG"),
        ("progressive.jpg", Image.fromarray(rgb), "JPEG-progressive"),
    ):
        buf = io.BytesIO()
        if fmt == "JPEG-progressive":
            im.save(buf, "JPEG", progressive=True, quality=80)
        else:
            im.save(buf, fmt)
        out[name] = buf.getvalue()
    return out


def _phantom_dicoms(folder: Path) -> dict[str, bytes]:
    """Phantom DICOMs written by app.phantoms: one per transfer syntax it picks."""
    from app.phantoms import write_phantom_study

    write_phantom_study(folder, n=10, size=32, seed=5)
    out: dict[str, bytes] = {}
    seen = set()
    for p in sorted((folder / "images").rglob("*.dcm")):
        data = p.read_bytes()
        import pydicom

        ts = str(
            pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.get(
                "TransferSyntaxUID", ""
            )
        )
        if ts not in seen:
            seen.add(ts)
            out[f"phantom-{ts}.dcm"] = data
    return out


def seed_corpus(work: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every seed: real DICOM, phantom DICOM, Pillow PNG/JPEG."""
    seeds = {**_real_dicoms(), **_phantom_dicoms(work / "phantoms"), **_pillow_images()}
    return sorted(seeds.items())


# --------------------------------------------------------------------------
# structured edits


def _u16(v: int) -> bytes:
    return int(v).to_bytes(2, "little")


_DICOM_FIELDS = {
    # tag bytes (group, element LE) -> (value offset from the tag, encoder)
    "Rows": (b"\x28\x00\x10\x00", 8, _u16),
    "Columns": (b"\x28\x00\x11\x00", 8, _u16),
    "BitsAllocated": (b"\x28\x00\x00\x01", 8, _u16),
    "BitsStored": (b"\x28\x00\x01\x01", 8, _u16),
    "SamplesPerPixel": (b"\x28\x00\x02\x00", 8, _u16),
    "PixelRepresentation": (b"\x28\x00\x03\x01", 8, _u16),
    "NumberOfFrames": (b"\x28\x00\x08\x00", 8, lambda v: str(v).encode()),
    # explicit VR OB/OW: tag, VR, 2 reserved, then the 4-byte length
    "PixelDataLength": (b"\xe0\x7f\x10\x00", 8, lambda v: int(v).to_bytes(4, "little")),
}
_INTERESTING = (
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    255,
    256,
    4095,
    32767,
    32768,
    60000,
    65535,
    2**31 - 1,
    2**32 - 1,
)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body).to_bytes(4, "big")
    return len(body).to_bytes(4, "big") + kind + body + crc


def _edit_field(data: bytes, field: str, value: int) -> bytes:
    """Set a size field to ``value``: DICOM tags, PNG IHDR (CRC fixed), JPEG SOF."""
    b = bytearray(data)
    if data.startswith(b"\x89PNG") and len(data) >= 33 and field in ("Rows", "Columns"):
        body = bytearray(data[16:29])
        at = 0 if field == "Columns" else 4
        body[at : at + 4] = min(value, 2**32 - 1).to_bytes(4, "big")
        return bytes(data[:8] + _png_chunk(b"IHDR", bytes(body)) + data[33:])
    if data.startswith(b"\xff\xd8") and field in ("Rows", "Columns", "SamplesPerPixel"):
        i = 2
        while i + 10 <= len(b) and b[i] == 0xFF:
            if b[i + 1] in (0xC0, 0xC1, 0xC2, 0xC3):
                off = {"Rows": 5, "Columns": 7, "SamplesPerPixel": 9}[field]
                size = 1 if field == "SamplesPerPixel" else 2
                b[i + off : i + off + size] = min(value, 256**size - 1).to_bytes(size, "big")
                return bytes(b)
            i += 2 + int.from_bytes(b[i + 2 : i + 4], "big")
        return data
    tag, off, enc = _DICOM_FIELDS[field]
    at = data.find(tag, 128 if len(data) > 132 else 0)
    if at < 0:
        return data
    explicit = data[at + 4 : at + 6].isalpha()
    if field == "NumberOfFrames":  # an IS string: keep the element's length
        n = int.from_bytes(b[at + 6 : at + 8] if explicit else b[at + 4 : at + 8], "little")
        raw = enc(value)[:n].ljust(n, b" ")
    elif field == "PixelDataLength":
        off = 8 if explicit else 4
        raw = enc(value)
    else:
        raw = (value % 2**16).to_bytes(2, "little")
    b[at + off : at + off + len(raw)] = raw
    return bytes(b)


def mutated(data: bytes, ops: list[tuple]) -> bytes:
    """``data`` with the edits ``ops`` applied in order (positions taken modulo length)."""
    for op in ops:
        kind = op[0]
        n = len(data)
        if kind == "replace":  # a whole new body behind a chosen magic
            data = op[1] + op[2]
        elif not n:
            continue
        elif kind == "flip":
            b = bytearray(data)
            b[op[1] % n] ^= 1 << op[2]
            data = bytes(b)
        elif kind == "byte":
            b = bytearray(data)
            b[op[1] % min(n, 2048)] = op[2]  # headers live up front
            data = bytes(b)
        elif kind == "truncate":
            data = data[: op[1] % n]
        elif kind == "insert":
            p = op[1] % n
            data = data[:p] + op[2] + data[p:]
        elif kind == "delete":
            p = op[1] % n
            data = data[:p] + data[p + op[2] :]
        elif kind == "field":
            data = _edit_field(data, op[1], op[2])
    return data


# --------------------------------------------------------------------------
# one decode, checked


class _Timeout(KeyboardInterrupt):
    """Raised by the per-example alarm (a KeyboardInterrupt: decode's wrappers let it by)."""


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def checked_decode(data: bytes, limit: float = EXAMPLE_LIMIT, **params: Any) -> tuple[str, float]:
    """Decode under an alarm; ("ok" | "item_error", seconds).  Anything else raises."""
    from flow import ItemError
    from nodes.decode import ATTRS, decoded

    t0 = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        out = decoded(data, **params)
    except ItemError as e:
        assert isinstance(e.reason, str) and e.reason.strip(), f"empty reason: {e!r}"
        return "item_error", time.perf_counter() - t0
    except _Timeout:
        raise AssertionError(f"decode did not return within {limit} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    dt = time.perf_counter() - t0
    assert isinstance(out, dict) and set(out) == {"pixels", *ATTRS}, sorted(out)
    px = out["pixels"]
    assert isinstance(px, np.ndarray) and px.dtype == np.float32 and px.ndim == 2, px.dtype
    assert px.size > 0 and np.isfinite(px).all() and px.min() >= 0.0 and px.max() <= 1.0
    assert (out["rows"], out["columns"]) == px.shape
    assert px.size <= params.get("max_pixels", 64_000_000)
    json.dumps({k: v for k, v in out.items() if k != "pixels"})
    return "ok", dt


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def fuzz_main(cfg: dict) -> dict:
    """The fuzz batch (run in a subprocess): statistics, or an exception on a bad outcome."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    work = Path(cfg["work"])
    seeds = seed_corpus(work)
    signal.signal(signal.SIGALRM, _alarm)
    params = {"max_pixels": cfg["max_pixels"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = {name: checked_decode(data, **params)[0] for name, data in seeds}
    rss0 = _max_rss_mib()
    stats: dict[str, Any] = {
        "seeds": base,
        "outcomes": Counter(),
        "max_seconds": 0.0,
        "slowest": "",
        "examples": 0,
        "per_seed": Counter(),
    }
    pos = st.integers(0, 2**32 - 1)
    op = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("byte"), pos, st.integers(0, 255)),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=48)),
        st.tuples(st.just("delete"), pos, st.integers(1, 512)),
        st.tuples(
            st.just("field"), st.sampled_from(sorted(_DICOM_FIELDS)), st.sampled_from(_INTERESTING)
        ),
    )
    magic = st.sampled_from(
        [
            b"",
            b"DICM",
            b"\0" * 128 + b"DICM",
            b"\x89PNG\r\n\x1a\n",
            b"\xff\xd8\xff",
            b"\x08\x00\x05\x00CS",
        ]
    )
    replace = st.tuples(st.just("replace"), magic, st.binary(max_size=600))
    ops = st.one_of(st.lists(op, min_size=1, max_size=6), st.lists(replace, min_size=1, max_size=1))

    @settings(
        max_examples=cfg["examples"],
        derandomize=cfg.get("derandomize", True),
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(
        seed=st.sampled_from(range(len(seeds))),
        edits=ops,
        frame=st.sampled_from(["middle", "first", "mean"]),
        voi=st.booleans(),
    )
    def one(seed: int, edits: list, frame: str, voi: bool) -> None:
        name, data = seeds[seed]
        bad = mutated(data, edits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome, dt = checked_decode(
                bad, cfg.get("limit", EXAMPLE_LIMIT), frame=frame, voi=voi, **params
            )
        if dt > 1.0:
            stats.setdefault("slow", []).append((round(dt, 2), f"{name} {edits!r}"[:300]))
        stats["outcomes"][outcome] += 1
        stats["per_seed"][name] += 1
        stats["examples"] += 1
        if dt > stats["max_seconds"]:
            stats["max_seconds"], stats["slowest"] = dt, f"{name} {edits!r}"[:300]

    t0 = time.perf_counter()
    one()
    stats["seconds"] = time.perf_counter() - t0
    stats["rss_before_mib"], stats["rss_after_mib"] = rss0, _max_rss_mib()
    return stats


def huge_main(cfg: dict) -> dict:
    """Huge declared sizes (run in a subprocess): each reason, seconds and RSS growth."""
    from flow import ItemError
    from nodes.decode import decoded

    cases = huge_inputs()
    for warm in ("warmup-dicom", "warmup-png", "warmup-jpeg"):
        decoded(cases.pop(warm)[0])  # imports and codec set-up are not the input's cost
    out = {}
    for name, (data, params) in cases.items():
        rss0 = _max_rss_mib()
        t0 = time.perf_counter()
        try:
            decoded(data, **params)
            reason = None
        except ItemError as e:
            reason = e.reason
        out[name] = {
            "reason": reason,
            "seconds": time.perf_counter() - t0,
            "rss_growth_mib": _max_rss_mib() - rss0,
        }
    return out


# --------------------------------------------------------------------------
# crafted inputs


def dicom_bytes(pixels: np.ndarray, **tags: Any) -> bytes:
    """A Secondary Capture DICOM of ``pixels`` with ``tags`` set over it (the
    crafted-DICOM builder of the decode tests)."""
    from tests.nodes.test_decode import _dicom_bytes

    return _dicom_bytes(pixels, **tags)


def png_header(width: int, height: int, color: int = 0) -> bytes:
    """A PNG declaring width x height (valid CRCs) over a few bytes of pixel data."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, color, 0, 0, 0])
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_with_size(rows: int, cols: int) -> bytes:
    """A small real JPEG whose SOF declares rows x cols."""
    return mutated(
        _pillow_images()["gray.jpg"], [("field", "Rows", rows), ("field", "Columns", cols)]
    )


def huge_inputs() -> dict[str, tuple[bytes, dict]]:
    """name -> (bytes, decode params): sizes far beyond max_pixels over tiny payloads."""
    tiny = np.zeros((2, 2), np.uint16)
    small = _pillow_images()
    return {
        "warmup-dicom": (dicom_bytes(np.zeros((8, 8), np.uint16)), {}),
        "warmup-png": (small["gray.png"], {}),
        "warmup-jpeg": (small["gray.jpg"], {}),
        "dicom-60000x60000": (dicom_bytes(tiny, Rows=60000, Columns=60000), {}),
        "dicom-65535x65535-rgb": (
            dicom_bytes(
                tiny, Rows=65535, Columns=65535, SamplesPerPixel=3, PhotometricInterpretation="RGB"
            ),
            {},
        ),
        "dicom-2147483647-frames": (
            dicom_bytes(tiny, NumberOfFrames="2147483647"),
            {"frame": "mean"},
        ),
        "png-100000x100000": (png_header(100_000, 100_000), {}),
        "png-9000x9000": (png_header(9000, 9000), {}),
        "jpeg-65500x65500": (jpeg_with_size(65500, 65500), {}),
    }


# --------------------------------------------------------------------------
# the tests: decode


@pytest.mark.slow
def test_decode_fuzz(tmp_path):
    """Hypothesis over mutated real files: a valid image or ItemError, quickly, in bounded
    memory (run in a subprocess; see ``fuzz_main``)."""
    pytest.importorskip("hypothesis")
    cfg = {"work": str(tmp_path), "examples": FUZZ_EXAMPLES, "max_pixels": FUZZ_MAX_PIXELS}
    res = _child("fuzz", cfg)
    assert res["examples"] == FUZZ_EXAMPLES
    # the seeds decode (so mutations start from images), both outcomes are common
    ok_seeds = [n for n, o in res["seeds"].items() if o == "ok"]
    assert len(ok_seeds) >= 0.8 * len(res["seeds"]) and len(res["seeds"]) >= 12, res["seeds"]
    assert res["outcomes"]["ok"] >= 0.04 * FUZZ_EXAMPLES, res["outcomes"]
    assert res["outcomes"]["item_error"] >= 0.5 * FUZZ_EXAMPLES, res["outcomes"]
    assert res["max_seconds"] < 5.0, (res["max_seconds"], res["slowest"])
    # max_pixels=4M bounds one example to ~4M float64 values and a few copies
    growth = res["rss_after_mib"] - res["rss_before_mib"]
    assert growth < 200, f"peak RSS grew by {growth:.0f} MiB over the batch"


def test_huge_declared_sizes_are_refused_before_allocating(tmp_path):
    res = _child("huge", {"work": str(tmp_path)}, timeout=120)
    for name, r in res.items():
        assert r["reason"], f"{name} decoded"
        assert "too large" in r["reason"], (name, r["reason"])
        assert r["seconds"] < 2.0, (name, r["seconds"])
        assert r["rss_growth_mib"] < 20, (name, r["rss_growth_mib"])
    assert "60000x60000" in res["dicom-60000x60000"]["reason"]
    assert "max_pixels=64,000,000" in res["dicom-60000x60000"]["reason"]
    assert "2147483647 frame(s)" in res["dicom-2147483647-frames"]["reason"]
    assert "9000x9000" in res["png-9000x9000"]["reason"]


def _zero_size_inputs() -> dict[str, bytes]:
    one = np.zeros((1, 1), np.uint16)
    return {
        "dicom-0-rows": dicom_bytes(one, Rows=0),
        "dicom-0-columns": dicom_bytes(one, Columns=0),
        "dicom-0x0-no-pixel-bytes": dicom_bytes(np.zeros((0, 0), np.uint16)),
        "dicom-0-bits": dicom_bytes(one, BitsAllocated=0, BitsStored=0),
        "png-0-wide": png_header(0, 10),
        "png-0-high": png_header(10, 0),
        "jpeg-0-rows": jpeg_with_size(0, 20),
        "jpeg-0-columns": jpeg_with_size(24, 0),
        "empty": b"",
        "dicm-only": b"\0" * 128 + b"DICM",
    }


@pytest.mark.parametrize("name", list(_zero_size_inputs()))
def test_zero_size_images_are_item_errors(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome, _ = checked_decode(_zero_size_inputs()[name], limit=30.0)
    assert outcome == "item_error"  # with a reason (checked_decode asserts it)


def _slow_jpeg_ls() -> bytes:
    """A 64 x 64 12-bit JPEG-LS DICOM with three bytes inserted 300 bytes from its end."""
    from pydicom.uid import JPEGLSLossless

    pytest.importorskip("jpeg_ls")
    import pydicom

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    img = (np.sin(yy / 7.0) + np.cos(xx / 5.0) + 2) * 4095 / 4 + rng.normal(0, 20, (64, 64))
    img = img.clip(0, 4095).astype(np.uint16)
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(img, BitsStored=12, HighBit=11)))
    ds.compress(JPEGLSLossless, img, encoding_plugin="pyjpegls")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    return data[:-300] + b"\x7c\xaa\xbc" + data[-300:]


def test_corrupt_jpeg_ls_decodes_quickly(tmp_path):
    (tmp_path / "slow.dcm").write_bytes(_slow_jpeg_ls())
    code = (
        "import sys, time; from nodes.decode import decoded; from flow import ItemError\n"
        "data = open(sys.argv[1], 'rb').read(); t = time.perf_counter()\n"
        "try: decoded(data)\nexcept ItemError: pass\n"
        "print(time.perf_counter() - t)\n"
    )
    try:
        res = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "slow.dcm")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=6,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("decoding a 4.5 kB file took more than 6 s")
    assert res.returncode == 0, res.stderr
    assert float(res.stdout.split()[-1]) < 2.0


# --------------------------------------------------------------------------
# the tests: nothing is unpickled


class _Payload:
    """Unpickling this creates a folder (the proof that code ran)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _assert_payloads_are_live(cases: dict[str, tuple[bytes, str, Path]]) -> None:
    """Loaded naively (``loader`` code on ``data``) in one subprocess, every payload runs
    its code: the tests that refuse them test something."""
    script = ["import io, pickle, sys", "import numpy"]
    for name, (blob, loader, marker) in cases.items():
        path = marker.parent / f"{name}.blob"
        path.write_bytes(blob)
        if "torch" in loader and "import torch" not in script:
            script.append("import torch")
        script.append(f"data = open({str(path)!r}, 'rb').read()")
        script.append(f"try:\n    {loader}\nexcept Exception:\n    pass")
    subprocess.run([sys.executable, "-c", "\n".join(script)], capture_output=True, timeout=120)
    for name, (_, loader, marker) in cases.items():
        assert marker.exists(), f"{name}: the payload did not run under {loader!r}"
        marker.rmdir()


def _weights_payloads(folder: Path) -> dict[str, tuple[bytes, str, Path]]:
    """Weights files that run code when unpickled: name -> (bytes, naive loader, marker)."""
    import pickle

    import torch

    out = {}
    for proto in (0, 2, 5):
        marker = folder / f"pwned-pickle-{proto}"
        out[f"pickle-{proto}"] = (
            pickle.dumps(_Payload(marker), protocol=proto),
            "pickle.loads(data)",
            marker,
        )
    marker = folder / "pwned-torch-zip"
    buf = io.BytesIO()
    torch.save({"conv.weight": torch.zeros(2), "extra": _Payload(marker)}, buf)
    out["torch-zip"] = (buf.getvalue(), "torch.load(io.BytesIO(data), weights_only=False)", marker)
    return out


def test_weights_that_would_run_code_are_refused(tmp_path):
    pytest.importorskip("torch")
    from flow import ItemError
    from nodes.embed import embedder_from_weights

    cases = _weights_payloads(tmp_path)
    _assert_payloads_are_live(cases)
    for name, (blob, _, marker) in cases.items():
        with pytest.raises(ItemError) as err:
            embedder_from_weights(blob, dim=4, size=16)
        reason = err.value.reason
        assert "not loadable" in reason or "not a loadable ONNX" in reason, (name, reason)
        assert not marker.exists(), f"{name}: loading the weights file ran its code"
    # torch's weights-only unpickler is what refuses the torch file
    with pytest.raises(ItemError, match=r"torch file but not loadable.*[Ww]eights"):
        embedder_from_weights(cases["torch-zip"][0], dim=4, size=16)


def _onnx_with_external_weights(folder: Path, size: int, dim: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    rng.standard_normal((size * size, dim)).astype(np.float32).tofile(folder / "weights.bin")
    w = numpy_helper.from_array(np.zeros((size * size, dim), np.float32), "w")
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("raw_data")
    entry = w.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    shape = numpy_helper.from_array(np.array([-1, size * size], np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["image", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["embedding"]),
        ],
        "external",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", dim])],
        [w, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def test_onnx_weights_with_external_data_are_refused(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from flow import ItemError
    from nodes.embed import embedder_from_weights

    model = _onnx_with_external_weights(tmp_path, 16, 4)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ItemError, match="external"):
        embedder_from_weights(model, dim=4, size=16)


_CODE_DIRS = ("flow", "store", "nodes", "cli")
_UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _const(keywords: dict, arg: str) -> Any:
    v = keywords.get(arg)
    return v.value if isinstance(v, ast.Constant) else None


def _unsafe_loads(tree: ast.AST) -> list[str]:
    """Calls and imports that can unpickle (or otherwise run) stored bytes."""
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import | ast.ImportFrom):
            names = [a.name for a in n.names] + (
                [n.module] if isinstance(n, ast.ImportFrom) else []
            )
            bad = [m for m in names if m and m.split(".")[0] in _UNPICKLERS]
            found += [f"line {n.lineno}: imports {m}" for m in bad]
        if not isinstance(n, ast.Call) or not isinstance(n.func, ast.Attribute):
            continue
        owner = ast.unparse(n.func.value)
        name = n.func.attr
        kw = {k.arg: k.value for k in n.keywords}
        if owner.split(".")[0] in _UNPICKLERS and name in ("load", "loads", "Unpickler", "open"):
            found.append(f"line {n.lineno}: {owner}.{name}")
        elif owner == "torch" and name == "load" and _const(kw, "weights_only") is not True:
            found.append(f"line {n.lineno}: torch.load without weights_only=True")
        elif (
            owner in ("np", "numpy") and name == "load" and _const(kw, "allow_pickle") is not False
        ):
            found.append(f"line {n.lineno}: np.load without allow_pickle=False")
        elif owner in ("pd", "pandas") and name == "read_pickle":
            found.append(f"line {n.lineno}: pandas.read_pickle")
        elif owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
            found.append(f"line {n.lineno}: yaml.{name}")
    return found


def test_no_code_path_unpickles_stored_bytes():
    offenders = {}
    files = [p for d in _CODE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    for path in files:
        found = _unsafe_loads(ast.parse(path.read_text(), str(path)))
        if found:
            offenders[str(path.relative_to(REPO))] = found
    assert not offenders, offenders
    # the checker itself catches what it should
    bad = (
        "import pickle\npickle.loads(b)\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
        "np.load(f)\nnp.load(f, allow_pickle=True)\nyaml.load(s)\n"
    )
    assert len(_unsafe_loads(ast.parse(bad))) == 7


def _object_npz(marker: Path, names: list[str]) -> bytes:
    """An npz whose arrays ``names`` are object arrays holding a code-running payload."""
    buf = io.BytesIO()
    evil = np.empty(1, dtype=object)
    evil[0] = _Payload(marker)
    np.savez(buf, **dict.fromkeys(names, evil))
    return buf.getvalue()


def test_crafted_caches_with_pickled_objects_are_not_unpickled(tmp_path):
    from engine.scan import StatCache
    from engine.testing import synthetic_graph, synthetic_inputs, write_synthetic_files
    from store import open_store
    from store.catalog import load_catalog

    data, root = tmp_path / "data", tmp_path / "store"
    write_synthetic_files(data, 12)
    st = open_store(root)
    items, sources = synthetic_inputs(data, st)
    from engine.builder import build

    assert build(synthetic_graph(), items, sources, st, progress=False).ok
    clean = load_catalog(st, "parsed", write_cache=False)
    marker = tmp_path / "pwned"
    fields = "version rkeys ckeys pack pos ids inputs failed_rkeys failed_pack failed_ids packs"
    evil = _object_npz(marker, fields.split())
    loader = "numpy.load(io.BytesIO(data), allow_pickle=True)['ids']"
    _assert_payloads_are_live({"catalog-npz": (evil, loader, marker)})
    st.put("cache/catalog/parsed.npz", evil)
    cat = load_catalog(st, "parsed")
    assert not marker.exists()
    assert sorted(cat.ids) == sorted(clean.ids) and len(cat) == len(clean)
    stat = StatCache(st, str(data))
    st.put(stat.path, _object_npz(marker, ["paths", "meta", "keys"]))
    items2, _ = synthetic_inputs(data, st)
    assert not marker.exists()
    assert items2.sources["files"] == items.sources["files"]


def test_zarr_metadata_asking_for_a_pickle_codec_is_refused(tmp_path):
    from engine.testing import synthetic_graph, synthetic_inputs, write_synthetic_files
    from flow.errors import CorruptObject
    from store import open_store
    from store.maintenance import verify
    from store.packs import PackReader

    data, root = tmp_path / "data", tmp_path / "store"
    write_synthetic_files(data, 6)
    st = open_store(root)
    items, sources = synthetic_inputs(data, st)
    from engine.builder import build

    assert build(synthetic_graph(), items, sources, st, progress=False).ok
    [meta] = (root / "packs" / "parsed").glob("*/_/zarr.json")
    doc = json.loads(meta.read_bytes())
    for codec in ({"name": "numcodecs.pickle"}, {"name": "pickle", "configuration": {}}):
        doc["codecs"] = [doc["codecs"][0], codec]
        meta.write_text(json.dumps(doc))
        with pytest.raises(CorruptObject, match="Unknown codec"):  # so a build quarantines it
            PackReader.open(st, "parsed", meta.parent.parent.name).read([0])
    assert [p.id for p in verify(st, repair=False)] == [meta.parent.parent.name]


# --------------------------------------------------------------------------
# the tests: source file names are ids, never paths


_ODD_NAMES = (
    "a..b.bin",
    "..\\..\\escape.bin",
    "%2e%2e%2fescape.bin",
    "new\nline.bin",
    "tab\there.bin",
    "ctl\x01\x7f.bin",
    "quote\"'`$(x).bin",
    "ünïcødé-画像-🩻.bin",
    "\u202eevil-rtl.bin",
    "-rf.bin",
    "~root.bin",
    " leading and trailing .bin",
    "C:\\Windows\\win.bin",
    "x" * 251 + ".bin",  # 255 bytes, the longest name Linux allows
)
_ODD_DIRS = ("packs/parsed", "objects", "refs", "store", "tmp", "quarantine", "..more")


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in files + dirs:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[p] = (st.st_size if not os.path.isdir(p) else -1, st.st_mtime_ns)
    return out


def test_odd_source_names_never_escape_the_store(tmp_path):
    from engine.builder import build
    from engine.testing import synthetic_graph, synthetic_inputs, write_synthetic_files
    from store import open_store
    from store.catalog import load_catalog

    data = tmp_path / "data"
    write_synthetic_files(data, 2)
    src = (data / "f000000.bin").read_bytes()
    names = list(_ODD_NAMES)
    for d in _ODD_DIRS:
        (data / d).mkdir(parents=True, exist_ok=True)
        names.append(f"{d}/x.bin")
    for i, name in enumerate(names):
        (data / name).write_bytes(src[:-2] + i.to_bytes(2, "big"))
    names = [n for n in names if not n.startswith(".")]  # hidden: skipped by design
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_text("untouched")
    root = tmp_path / "store"
    before = {k: v for k, v in _tree(tmp_path).items() if not k.startswith(str(root))}

    st = open_store(root)
    items, sources = synthetic_inputs(data, st)
    rep = build(synthetic_graph(), items, sources, st, progress=False)
    assert rep.ok, rep.failures
    assert rep.steps["parsed"].computed == len(names) + 2
    ids = set(load_catalog(st, "histogram", write_cache=False).ids)
    assert ids == {*names, "f000000.bin", "f000001.bin"}  # ids verbatim

    after = {k: v for k, v in _tree(tmp_path).items() if not k.startswith(str(root))}
    assert after == before, set(after) ^ set(before)
    for p in root.rglob("*"):  # store paths are made of node names, keys and ids
        rel = p.relative_to(root).as_posix()
        assert all(c.isascii() and (c.isalnum() or c in "._-/") for c in rel), rel
    rep = build(synthetic_graph(), *synthetic_inputs(data, st), st, progress=False)
    assert rep.ok and all(s.computed == 0 for s in rep.steps.values())


def test_source_name_that_is_not_utf8(tmp_path):
    from engine.builder import build
    from engine.testing import synthetic_graph, synthetic_inputs, write_synthetic_files
    from store import open_store

    data = tmp_path / "data"
    write_synthetic_files(data, 3)
    with open(os.path.join(os.fsencode(data), b"latin1-\xe9t\xe9.bin"), "wb") as f:
        f.write(b"\x01" * 256)
    st = open_store(tmp_path / "store")
    items, sources = synthetic_inputs(data, st)
    rep = build(synthetic_graph(), items, sources, st, progress=False)
    assert rep.ok and rep.steps["parsed"].computed == 4


# --------------------------------------------------------------------------
# subprocess entry


def _child(mode: str, cfg: dict, timeout: float = CHILD_TIMEOUT) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, mode, json.dumps(cfg)],
        cwd=cfg["work"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, (
        f"{mode} child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    _mode, _cfg = sys.argv[1], json.loads(sys.argv[2])
    _res = {"fuzz": fuzz_main, "huge": huge_main}[_mode](_cfg)
    print(json.dumps(_res, default=dict))
