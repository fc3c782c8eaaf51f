"""decode: one source file's bytes -> a display-ready gray image plus a few safe attributes.

The format comes from the content, never a file name: DICOM (128-byte preamble + ``DICM``,
``DICM`` alone, or a raw dataset starting at group 0002/0008) through pydicom and its
pixel-data plugins (pylibjpeg, pyjpegls, Pillow, tried in pydicom's order; GDCM left out,
see ``_EXCLUDED_PLUGINS``), PNG and JPEG through Pillow.  Nothing here is a codec.

``pixels`` is float32 (rows, columns) in [0, 1], 1 = bright as a radiologist sees it:

* MONOCHROME1/2 DICOM: modality LUT (rescale or Modality LUT Sequence,
  ``apply_modality_lut``); then, with ``voi=True`` where the file has one, the first VOI
  LUT or window (``apply_voi_lut``'s choice) mapped from its own output range to [0, 1];
  otherwise min-max (a constant image becomes 0).  A VOI module that is unusable (width
  below 1, empty LUT) or that maps a non-constant image to one value (a window nowhere
  near the data) gives way to min-max.  MONOCHROME1 is then inverted (``1 - x``);
  Presentation LUT Shape is not applied on top.  Per-frame functional groups (enhanced
  CT/MR) are not read: only top-level rescale and window apply.
* Color DICOM: YBR_FULL(_422) -> RGB by pydicom (``convert_color_space``), PALETTE COLOR
  through ``apply_color_lut``; RGB scaled by its full range (2**BitsStored - 1, or the
  palette entry depth), then BT.601 luma (0.299, 0.587, 0.114), as Pillow's "L".
* Multi-frame, ``frame=``: ``"middle"`` decodes only frame ``n // 2`` (0-based),
  ``"first"`` only frame 0, ``"mean"`` all frames, taken through the rules above with one
  min-max over the whole stack, then averaged.
* PNG/JPEG: scaled by the format's full range (255; 1 for 1-bit); 16-bit gray by the
  range of the bits its values use (``2**b - 1``, the smallest ``b`` of 8, 10, 12, 14,
  16 holding its largest value: :func:`_stored_range`), as PNG carries no BitsStored
  -- a 16-bit PNG of 8-bit values decodes as the 8-bit PNG does;
  EXIF orientation applied, palettes expanded, color to luma, alpha composited on black
  (``gray * alpha``: transparent reads as 0, like normalize's padding).  An animated PNG
  gives its first frame.

Safety: bad bytes raise :class:`flow.ItemError` with a reason and nothing else (library
calls are wrapped, Rust panics included).  Before any pixel buffer is decoded, rows x
columns x samples x decoded frames (all for ``"mean"``, else one) from the DICOM header
or Pillow's header parse is checked against ``max_pixels``, and a compressed frame's own
SOF/SIZ size must match the header.  Pillow's decompression-bomb error becomes an
ItemError and its warning is silenced, without touching ``PIL.Image.MAX_IMAGE_PIXELS``
(so a PNG/JPEG over Pillow's hard limit is refused whatever ``max_pixels``).  Library
warnings are muted while decoding (``catch_warnings`` is process-global in Python 3.11:
a thread beside a decode may see warnings muted briefly).

PHI: only :data:`ATTRS` are returned; StudyInstanceUID only as HMAC-SHA256 keyed with
``study_salt`` (128 bits, hex).  The salt is a parameter, hence in every recipe.

Deterministic: the same bytes give bit-identical float32 (elementwise float64 numpy, one
cast).  Lossy JPEG output can differ between codec builds; recipes record versions.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import os
import re
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from flow import Blob, ItemError, node

# The only keys ``decoded`` returns, besides the pixels: no patient name/ID/birth date,
# accession number or UID in clear.  ``study`` is a salted hash of StudyInstanceUID.
ATTRS = (
    "format",
    "modality",
    "photometric",
    "transfer_syntax",
    "frames",
    "bits_stored",
    "rows",
    "columns",
    "view_position",
    "body_part",
    "study",
)
# DICOM keywords copied (as short text) into the attributes above.
_DICOM_TEXT = (
    ("modality", "Modality"),
    ("view_position", "ViewPosition"),
    ("body_part", "BodyPartExamined"),
)
_IDENTIFIERS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_FRAME_RULES = ("middle", "first", "mean")
_LUMA = (0.299, 0.587, 0.114)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_MAX_TEXT = 64
# JPEG SOF0-15 (not DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55 markers.
_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
# pydicom plugins never used: GDCM's JPEG codec aborts the whole process (an uncaught
# C++ gdcm::Exception, "terminate called") on some corrupt JPEG streams, which no
# Python code can catch.  Every transfer syntax it covers has another plugin here.
_EXCLUDED_PLUGINS = ("gdcm",)
# Tried first where available: pyjpegls (CharLS) can spend 15-25 s of C time on a
# corrupt JPEG-LS stream that pylibjpeg rejects (or decodes) in milliseconds.
_PREFERRED_PLUGINS = ("pylibjpeg",)


@node(version=1)
def decoded(
    source: bytes,
    *,
    frame: str = "middle",
    voi: bool = True,
    max_pixels: int = 64_000_000,
    study_salt: str = "",
) -> dict:
    """A display-ready float32 gray image in [0, 1] and whitelisted attributes."""
    if frame not in _FRAME_RULES:
        raise ValueError(f"frame must be one of {', '.join(_FRAME_RULES)}, not {frame!r}")
    data = source.data if isinstance(source, Blob) else source
    data = data if isinstance(data, bytes) else bytes(data)
    fmt = _sniffed_format(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "dicom":
            out = _decoded_dicom(data, frame, voi, max_pixels, study_salt)
        else:
            out = _decoded_pillow(data, fmt, max_pixels)
    gray = out["pixels"]
    if not np.isfinite(gray).all():
        raise ItemError("decoded image has non-finite values (NaN or infinity)")
    out["pixels"] = np.clip(gray, 0.0, 1.0, out=gray).astype(np.float32)
    return out


def dicom_identifiers(path_or_bytes: str | os.PathLike | bytes) -> dict[str, str]:
    """SOP/Study/Series Instance UID and Accession Number from a DICOM header.

    Reads the header only (``stop_before_pixels``); for joining a labels table on a
    DICOM identifier at planning time.  Absent values are ``""``; a file that is not
    DICOM raises ItemError.
    """
    from pydicom import dcmread

    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        data = bytes(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as f:
            data = f.read(1 << 20)  # the header: a truncated tail is fine
    if _sniffed_format(data) != "dicom":
        raise ItemError("not a DICOM file")
    with warnings.catch_warnings(), _as_item_error("unreadable DICOM header"):
        warnings.simplefilter("ignore")
        ds = dcmread(_dicom_stream(data), force=True, stop_before_pixels=True)
        return {k: _text(ds.get(k), limit=None) for k in _IDENTIFIERS}


# --------------------------------------------------------------------------
# format detection


def _sniffed_format(data: bytes) -> str:
    if data[128:132] == b"DICM" or data[:4] == b"DICM" or _is_raw_dicom(data):
        return "dicom"
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if not data:
        raise ItemError("empty file")
    raise ItemError(f"not a DICOM, PNG or JPEG file (starts with {data[:8].hex(' ')})")


def _is_raw_dicom(data: bytes) -> bool:
    """A dataset without preamble: starts with a group 0002 or 0008 element."""
    if len(data) < 12:
        return False
    le, be = int.from_bytes(data[:2], "little"), int.from_bytes(data[:2], "big")
    if le not in (0x0002, 0x0008) and be not in (0x0002, 0x0008):
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    length = int.from_bytes(data[4:8], "little" if le in (2, 8) else "big")
    return length <= len(data) - 8


def _dicom_stream(data: bytes) -> io.BytesIO:
    # "DICM" without the 128-byte preamble: pydicom then needs the file meta first.
    return io.BytesIO(data[4:] if data[:4] == b"DICM" else data)


# --------------------------------------------------------------------------
# DICOM


def _decoded_dicom(data: bytes, frame: str, voi: bool, max_pixels: int, salt: str) -> dict:
    from pydicom import dcmread
    from pydicom.pixels import apply_color_lut, convert_color_space

    with warnings.catch_warnings(record=True) as caught, _as_item_error("unreadable DICOM"):
        warnings.simplefilter("always")
        ds = dcmread(_dicom_stream(data), force=True)
    eof = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    try:
        with _as_item_error("unreadable DICOM"):
            info, samples, pixel_kw = _dicom_info(ds, salt)
    except ItemError as e:
        if eof:  # pydicom stops quietly at a premature end; say so
            where = re.sub(r"\s+in file .*$", "", eof[0].strip())
            raise ItemError(f"truncated DICOM ({where}): {e.reason}") from None
        raise
    decoded_frames = info["frames"] if frame == "mean" else 1
    _check_size(info["rows"], info["columns"], decoded_frames, samples, max_pixels)
    arr, pi = _dicom_array(ds, info, frame, pixel_kw, samples)
    expected = (decoded_frames,) if decoded_frames > 1 else ()
    expected += (info["rows"], info["columns"]) + ((samples,) if samples > 1 else ())
    if arr.shape != expected:
        raise ItemError(f"decoded pixel array has shape {arr.shape}, the header says {expected}")
    if (samples == 1) != pi.startswith(("MONOCHROME", "PALETTE")):
        raise ItemError(f"photometric interpretation {pi!r} with {samples} sample(s) per pixel")
    with _as_item_error(f"cannot apply the DICOM {pi} lookup tables"):
        if pi in ("MONOCHROME1", "MONOCHROME2"):
            gray = _dicom_gray(arr, ds, voi)
            if pi == "MONOCHROME1":
                gray = np.subtract(1.0, gray, out=gray)
        elif pi == "PALETTE COLOR":
            rgb = apply_color_lut(arr, _native_palette(ds))
            gray = _luma(rgb, np.iinfo(rgb.dtype).max)
        elif pi == "RGB":
            gray = _luma(arr, 2.0 ** info["bits_stored"] - 1)
        elif pi in ("YBR_FULL", "YBR_FULL_422"):
            gray = _luma(convert_color_space(arr, pi, "RGB"), 255.0)
        else:
            raise ItemError(f"unsupported DICOM photometric interpretation {pi!r}")
    if gray.ndim == 3:  # frame="mean": the stack, one shared scale
        gray = gray.mean(axis=0)
    return {"pixels": gray, **info}


def _dicom_info(ds: Any, salt: str) -> tuple[dict, int, str]:
    """The whitelisted attributes (after checking the header describes an image),
    the samples per pixel and the pixel data keyword."""
    pixel_kw = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if pixel_kw is None:
        meta = getattr(ds, "file_meta", None) or {}
        sop = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
        name = getattr(sop, "name", None) or (str(sop) if sop else "unknown")
        raise ItemError(f"DICOM has no pixel data (SOP class {name})")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) in (None, "")]
    if missing:
        raise ItemError(f"DICOM image lacks {', '.join(missing)}")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows < 1 or cols < 1:
        raise ItemError(f"DICOM image has no pixels ({rows}x{cols})")
    frames = ds.get("NumberOfFrames")
    frames = int(frames) if frames not in (None, "") and int(frames) > 0 else 1
    bits_stored = ds.get("BitsStored")
    ts = _transfer_syntax(ds)
    study = ds.get("StudyInstanceUID")
    info = {attr: _text(ds.get(kw)) for attr, kw in _DICOM_TEXT}
    info |= {
        "format": "dicom",
        "photometric": _text(ds.get("PhotometricInterpretation")),
        "transfer_syntax": str(ts),
        "frames": frames,
        "bits_stored": int(bits_stored if bits_stored not in (None, "") else ds.BitsAllocated),
        "rows": rows,
        "columns": cols,
        "study": hmac.new(salt.encode(), str(study).encode(), "sha256").hexdigest()[:32]
        if study
        else "",
    }
    return info, int(ds.get("SamplesPerPixel") or 1), pixel_kw


def _transfer_syntax(ds: Any) -> Any:
    """The transfer syntax; for a dataset without one, the encoding pydicom read it in."""
    from pydicom import uid
    from pydicom.dataset import FileMetaDataset

    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts:
        return uid.UID(ts)
    elem = ds.data_element("PixelData")
    if elem is not None and elem.is_undefined_length:
        raise ItemError("DICOM has compressed pixel data but no Transfer Syntax UID")
    implicit, little = ds.original_encoding
    if little is None:
        raise ItemError("DICOM has no Transfer Syntax UID and its encoding is unknown")
    ts = uid.ImplicitVRLittleEndian if implicit else uid.ExplicitVRLittleEndian
    ts = ts if little else uid.ExplicitVRBigEndian
    ds.file_meta.TransferSyntaxUID = ts
    return ts


def _check_size(r: int, c: int, f: int, s: int, max_pixels: int) -> None:
    """Reject before decoding: rows x columns x decoded frames x samples > max_pixels."""
    n = r * c * f * s
    if n > max_pixels:
        raise ItemError(
            f"image too large: {r}x{c} x {f} frame(s) x {s} sample(s) = {n:,} values "
            f"exceeds max_pixels={max_pixels:,}"
        )


def _dicom_array(
    ds: Any, info: dict, frame: str, pixel_kw: str, samples: int
) -> tuple[np.ndarray, str]:
    """Decode the selected frame(s); returns the array and its photometric after decode."""
    from pydicom import uid
    from pydicom.pixels import get_decoder
    from pydicom.pixels.utils import get_expected_length

    ts = uid.UID(str(ds.file_meta.TransferSyntaxUID))
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ItemError(f"unsupported transfer syntax {ts.name or 'unknown'} ({ts})") from None
    if not decoder.is_available:
        need = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise ItemError(f"no decoder installed for {ts.name}: needs {need}")
    n = info["frames"]
    index = None if frame == "mean" and n > 1 else (0 if frame == "first" else n // 2)
    if not ts.is_encapsulated:
        with _as_item_error("inconsistent DICOM image header"):
            expected = get_expected_length(ds)
            found = len(ds[pixel_kw].value or b"")
            if pixel_kw == "PixelData" and found < expected:
                raise ItemError(f"truncated pixel data: expected {expected} bytes, found {found}")
    else:
        _check_codestreams(ds, ts, info, samples, index)
    plugins = [p for p in decoder.available_plugins if p not in _EXCLUDED_PLUGINS]
    plugins.sort(key=lambda p: p not in _PREFERRED_PLUGINS)  # stable: otherwise pydicom's
    if ts.is_encapsulated and not plugins:
        raise ItemError(f"no usable decoder installed for {ts.name}")
    failures = []
    for plugin in plugins or [""]:  # native data: pydicom's own, unnamed
        try:
            with _as_item_error(plugin or "pydicom"):
                arr, meta = decoder.as_array(ds, index=index, decoding_plugin=plugin)
            break
        except ItemError as e:
            failures.append(e.reason)
    else:
        raise ItemError(f"cannot decode {ts.name} pixel data: {'; '.join(failures)}")
    return arr, str(meta.get("photometric_interpretation", info["photometric"]))


def _check_codestreams(ds: Any, ts: Any, info: dict, samples: int, index: int | None) -> None:
    """The size a JPEG / JPEG-LS / JPEG 2000 frame declares must match the header.

    A codec allocates what its codestream says, so a 10x10 header over a
    60000x60000 codestream would get past the ``max_pixels`` check; this reads only
    the SOF / SIZ size fields of the frames that will be decoded.
    """
    from pydicom import uid
    from pydicom.encaps import generate_frames, get_frame

    if ts in uid.JPEG2000TransferSyntaxes:
        size_of = _j2k_size
    elif ts in uid.JPEGTransferSyntaxes or ts in uid.JPEGLSTransferSyntaxes:
        size_of = _jpeg_size
    else:
        return
    n, header = info["frames"], (info["rows"], info["columns"], samples)
    with _as_item_error("unreadable encapsulated pixel data"):
        if index is None:
            frames = generate_frames(ds.PixelData, number_of_frames=n)
        else:
            frames = [get_frame(ds.PixelData, index, number_of_frames=n)]
        for data in frames:
            size = size_of(data)
            if size is not None and size != header and size != (0, *header[1:]):
                raise ItemError(
                    f"compressed frame is {'x'.join(map(str, size))} (rows x columns x "
                    f"components), the header says {'x'.join(map(str, header))}"
                )


def _jpeg_size(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG or JPEG-LS SOF segment, or None."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 10 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker in _SOF_MARKERS:
            rows, cols = data[i + 5 : i + 7], data[i + 7 : i + 9]
            return int.from_bytes(rows, "big"), int.from_bytes(cols, "big"), data[i + 9]
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _j2k_size(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG 2000 SIZ segment (raw or in JP2), or None."""
    o = data.find(b"\xff\x4f\xff\x51")  # SOC then SIZ
    if o < 0 or len(data) < o + 42:
        return None
    x, y, x0, y0 = (int.from_bytes(data[o + k : o + k + 4], "big") for k in (8, 12, 16, 20))
    return y - y0, x - x0, int.from_bytes(data[o + 40 : o + 42], "big")


def _native_palette(ds: Any) -> Any:
    """Palette LUT data in native byte order.

    pydicom 3.0 reads non-segmented 16-bit Palette Color LUT Data with
    ``np.frombuffer`` in native order, which byte-swaps the tables of Explicit VR
    Big Endian files (OBXXXX1A_expb.dcm).  Swap them here; a test compares the big
    and little endian files so a fixed pydicom shows up.
    """
    from pydicom import uid

    if ds.file_meta.TransferSyntaxUID != uid.ExplicitVRBigEndian:
        return ds
    n = int(ds.RedPaletteColorLookupTableDescriptor[0]) or 65536
    for color in ("Red", "Green", "Blue", "Alpha"):
        kw = f"{color}PaletteColorLookupTableData"
        value = ds.get(kw)
        if isinstance(value, bytes) and len(value) == 2 * n:
            ds[kw].value = np.frombuffer(value, ">u2").astype("<u2").tobytes()
    return ds


def _usable_modality_lut(ds: Any) -> Any:
    """Drop empty Modality LUT elements (as some writers leave them) so that pydicom
    applies what is there: a table with data, else the rescale with defaults 1 / 0."""
    seq = ds.get("ModalityLUTSequence")
    if seq is not None and not (seq and _has(seq[0], "LUTDescriptor", "LUTData")):
        del ds.ModalityLUTSequence
    rescale = {"RescaleSlope": 1.0, "RescaleIntercept": 0.0}
    for kw in rescale:
        if kw in ds and ds.get(kw) in (None, ""):
            del ds[kw]
    if sum(kw in ds for kw in rescale) == 1:
        for kw, default in rescale.items():
            if kw not in ds:
                setattr(ds, kw, default)
    return ds


def _dicom_gray(arr: np.ndarray, ds: Any, voi: bool) -> np.ndarray:
    """Modality LUT, then VOI LUT/window (or min-max), as float64 in [0, 1]."""
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    x = apply_modality_lut(arr, _usable_modality_lut(ds))
    kind = _voi_kind(ds) if voi else None
    if kind is not None:
        try:
            if kind == "lut":
                if x.dtype.kind == "f":
                    x = np.rint(x).astype(np.int64)  # a LUT is indexed by integers
                n, first, _ = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
                probe = np.arange(first, first + (n or 65536), dtype=np.int64)
                transform = apply_voi
            else:
                probe = np.array([-np.inf, np.inf])  # the window's output range
                transform = apply_windowing
            # one call for the image and the probe: pydicom's per-call overhead dominates
            both = np.asarray(transform(np.concatenate([x.ravel(), probe]), ds), np.float64)
            y, edges = both[: x.size].reshape(x.shape), both[x.size :]
        except (ValueError, TypeError, KeyError, IndexError, NotImplementedError):
            pass  # an unusable VOI module: fall back to min-max below
        else:
            lo, hi = float(edges.min()), float(edges.max())
            if hi > lo and (y.min() < y.max() or x.min() == x.max()):
                y -= lo
                y *= 1.0 / (hi - lo)
                return y
    return _minmax(x)


def _voi_kind(ds: Any) -> str | None:
    """Which VOI transform applies, as ``apply_voi_lut`` decides: "lut", "window" or None."""
    seq = ds.get("VOILUTSequence")
    if seq and _has(seq[0], "LUTDescriptor", "LUTData"):
        return "lut"
    if _has(ds, "WindowCenter", "WindowWidth"):
        return "window"
    return None


def _has(ds: Any, *keywords: str) -> bool:
    return all(ds.get(k) not in (None, "") for k in keywords)


def _minmax(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float64)  # a copy: x may be the decoder's buffer
    lo, hi = x.min(), x.max()
    if hi > lo:
        x -= lo
        x *= 1.0 / (hi - lo)
    else:
        x[...] = 0.0
    return x


def _luma(rgb: np.ndarray, full_scale: float) -> np.ndarray:
    """BT.601 luma of (..., 3) color values, scaled to [0, 1] by ``full_scale``."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    r *= _LUMA[0] / full_scale
    r += g * (_LUMA[1] / full_scale)
    r += b * (_LUMA[2] / full_scale)
    return r


# --------------------------------------------------------------------------
# PNG / JPEG


def _decoded_pillow(data: bytes, fmt: str, max_pixels: int) -> dict:
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt.upper()])
    except Image.DecompressionBombError as e:
        raise ItemError(f"image too large for Pillow: {_brief(e)}") from None
    except Exception as e:
        raise ItemError(f"unreadable {fmt.upper()}: {_brief(e)}") from None
    w, h = im.size
    bits = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 16}.get(im.mode, 8)
    info = dict.fromkeys(ATTRS, "") | {
        "format": fmt,
        "photometric": im.mode,
        "bits_stored": bits,
        "frames": int(getattr(im, "n_frames", 1)),
    }
    if w < 1 or h < 1:
        raise ItemError(f"{fmt.upper()} has no pixels ({h}x{w})")
    _check_size(h, w, 1, len(im.getbands()), max_pixels)
    with _as_item_error(f"cannot decode {fmt.upper()}"):
        im.load()
        im = ImageOps.exif_transpose(im)
        gray = _pillow_gray(im)
    info["rows"], info["columns"] = gray.shape
    return {"pixels": gray, **info}


def _pillow_gray(im: Any) -> np.ndarray:
    mode = im.mode
    if (mode == "P" and "transparency" in im.info) or mode == "PA":
        im, mode = im.convert("RGBA"), "RGBA"
    elif mode in ("P", "CMYK", "YCbCr", "RGBX", "LAB", "HSV"):
        im, mode = im.convert("RGB"), "RGB"
    a = np.asarray(im)
    if mode == "1":
        return a.astype(np.float64)
    if mode in ("L", "LA"):
        gray = a[..., 0] if mode == "LA" else a
        gray = gray.astype(np.float64) * (1.0 / 255.0)
    elif mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = a.astype(np.float64) * (1.0 / _stored_range(a))
    elif mode in ("RGB", "RGBA"):
        gray = _luma(a, 255.0)
    else:
        raise ItemError(f"unsupported image mode {mode!r}")
    if mode in ("LA", "RGBA"):
        gray *= a[..., -1] * (1.0 / 255.0)  # composite on black
    return gray


def _stored_range(a: np.ndarray) -> float:
    """What a 16-bit gray PNG's values are scaled by: ``2**b - 1`` for the smallest
    ``b`` of 8, 10, 12, 14, 16 that holds its largest value (PNG has no BitsStored).

    So a 16-bit PNG of 8-bit values (0-255) decodes exactly as the 8-bit PNG of the
    same values, and 12-bit data (0-4095) fills the range instead of its 16th."""
    top = int(a.max()) if a.size else 0
    for b in (8, 10, 12, 14, 16):
        if top < 1 << b:
            return float((1 << b) - 1)
    return float(top)


# --------------------------------------------------------------------------
# small helpers


@contextlib.contextmanager
def _as_item_error(what: str):
    """Turn whatever a library raises on bad bytes into ItemError("what: reason").

    Catches BaseException because Rust codecs (pylibjpeg-rle) panic with pyo3's
    PanicException, which is not an Exception; interrupts and MemoryError (the
    machine's state, not the item's) pass through.
    """
    try:
        yield
    except (ItemError, KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as e:
        raise ItemError(f"{what}: {_brief(e)}") from None


def _text(value: Any, limit: int | None = _MAX_TEXT) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        value = "\\".join(str(v) for v in value)
    s = str(value).strip()
    return s if limit is None else s[:limit]


def _brief(e: BaseException, limit: int = 300) -> str:
    """One line of an exception: its type and message, whitespace collapsed."""
    msg = re.sub(r"\s+", " ", str(e)).strip()
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
