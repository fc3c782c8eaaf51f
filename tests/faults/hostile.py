"""Crafted hostile DICOM files: a deflate bomb, and a frame that keeps a decoder busy.

Both are valid enough to get past every check ``decode`` makes before it reads pixels:
their harm is in what the libraries do with them.

* :func:`deflate_bomb` -- a Deflated Explicit VR Little Endian dataset (transfer
  syntax 1.2.840.10008.1.2.1.99) whose pixel data is zeros: ``size`` bytes inflate
  from about ``size / 1000``.  pydicom inflates the whole dataset while reading the
  header, before any size check can look at it.
* :func:`busy_frame` -- a 1 GiB bomb: inflating it and failing the size check after
  takes ``decode`` 4-5 s of CPU here (and a gigabyte), far past a test's 2 s limit --
  a decode that does not come back, as an operator meets it.  A node that never
  returns at all is in ``tests/engine/test_sandbox.py``.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid

DEFLATED = "1.2.840.10008.1.2.1.99"


def deflate_bomb(path: Path, size: int, **tags: str) -> Path:
    """A DICOM file whose dataset inflates to ``size`` bytes of pixel data."""
    side = int((size // 2) ** 0.5)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = side
    ds.Columns = side
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(side * side * 2)
    ds["PixelData"].VR = "OW"
    raw = _explicit_le(ds)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = comp.compress(raw) + comp.flush()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DEFLATED
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1"
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(out, meta, enforce_standard=True)
    out.write(deflated)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    return path


def _explicit_le(ds: Dataset) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = False
    pydicom.filewriter.write_dataset(buf, ds)
    return buf.getvalue()


def busy_frame(path: Path, **tags: str) -> Path:
    """A file that keeps ``decode`` busy for many seconds (see the module doc)."""
    return deflate_bomb(path, 1 << 30, **tags)
