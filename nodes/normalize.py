"""normalize: a decoded image -> a fixed-size float32 square in [0, 1].

Aspect handling (``aspect=``):

* ``"pad"`` (default): letterbox.  The image is resized so that its longer side is
  ``size`` (the shorter side keeps the aspect ratio, rounded, at least 1 px) and centred
  on a ``size`` x ``size`` canvas of 0 (black; an odd leftover pixel goes to the
  bottom/right).  Same picture as padding to a square first and resizing after, but
  the work and memory stay bounded by the image itself even for a 1 x 10^7 strip.
* ``"crop"``: the centred square of side min(rows, columns), then resized.
* ``"stretch"``: resized to the square directly, the aspect ratio not kept.

Resizing is Pillow's on a 32-bit float ("F") image with the bilinear filter, which
widens its support when shrinking (an antialiased triangle filter).  Its weights are
non-negative, so no ringing takes values outside [0, 1]; the result is clipped to
[0, 1] anyway.  Pillow's resampling is single-threaded C, so the output is
bit-identical run to run.

Input: the dict from ``decoded`` (its ``"pixels"``) or a bare 2-D array.  Float input
is taken as [0, 1] intensities (clipped); integers are scaled by their dtype's maximum
(negative values clipped to 0) and booleans read as 0/1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flow import ItemError, node

_ASPECTS = ("pad", "crop", "stretch")


@node(version=1)
def normalized(image: Any, *, size: int = 64, aspect: str = "pad") -> np.ndarray:
    """A float32 (size, size) image in [0, 1]."""
    if aspect not in _ASPECTS:
        raise ValueError(f"aspect must be one of {', '.join(_ASPECTS)}, not {aspect!r}")
    if size < 1:
        raise ValueError(f"size must be at least 1, not {size}")
    pixels = image["pixels"] if isinstance(image, dict) else image
    img = _unit_float32(pixels)
    h, w = img.shape
    if aspect == "stretch":
        return _resized(img, size, size)
    if aspect == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return _resized(img[top : top + side, left : left + side], size, size)
    scale = size / max(h, w)
    nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = _resized(img, nh, nw)
    return out


def _unit_float32(pixels: Any) -> np.ndarray:
    """The image as a C-contiguous float32 2-D array in [0, 1], or ItemError."""
    a = np.asarray(pixels)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ItemError(f"expected a non-empty 2-D gray image, got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.float32)
    elif a.dtype.kind in "ui":
        a = np.clip(a.astype(np.float32) / np.float32(np.iinfo(a.dtype).max), 0.0, 1.0)
    elif a.dtype.kind == "f":
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ItemError("image has non-finite values (NaN or infinity)")
        a = np.clip(a, 0.0, 1.0)
    else:
        raise ItemError(f"unsupported pixel dtype {a.dtype}")
    return np.ascontiguousarray(a)


def _resized(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    from PIL import Image

    if img.shape == (rows, cols):
        return img.astype(np.float32, copy=True)
    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32))
    out = np.asarray(pil.resize((cols, rows), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)
