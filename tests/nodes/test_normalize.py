"""Tests of nodes.normalize: shape, range, aspect modes, input forms, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from flow import ItemError
from nodes.normalize import normalized

RNG = np.random.default_rng(11)


@pytest.mark.parametrize("aspect", ["pad", "crop", "stretch"])
@pytest.mark.parametrize("shape", [(100, 50), (50, 100), (64, 64), (3, 7), (1, 900), (700, 513)])
def test_shape_dtype_range(aspect, shape):
    out = normalized(RNG.random(shape), size=32, aspect=aspect)
    assert out.shape == (32, 32) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


def test_pad_letterboxes_with_zero():
    tall = np.ones((100, 50))
    out = normalized(tall, size=64, aspect="pad")
    assert (out[:, :16] == 0).all() and (out[:, 48:] == 0).all()
    np.testing.assert_allclose(out[:, 16:48], 1.0, atol=1e-6)
    wide = normalized(np.ones((51, 100)), size=64, aspect="pad")  # 32.64 rows -> 33
    assert (wide[:15] == 0).all() and (wide[48:] == 0).all() and (wide[15:48] > 0.99).all()


def test_crop_takes_the_centre_square():
    img = np.zeros((60, 120))
    img[:, 30:90] = 1.0  # exactly the central 60x60 square
    np.testing.assert_allclose(normalized(img, size=30, aspect="crop"), 1.0, atol=1e-6)
    stretched = normalized(img, size=30, aspect="stretch")
    assert stretched[:, 0].max() == 0.0 and stretched[:, 15].min() > 0.99


def test_stretch_keeps_a_horizontal_ramp():
    ramp = np.tile(np.linspace(0, 1, 200), (40, 1))
    out = normalized(ramp, size=50, aspect="stretch")
    assert np.all(np.diff(out[20]) > 0)  # monotone across, constant down
    np.testing.assert_allclose(out, np.tile(out[20], (50, 1)), atol=1e-6)


def test_antialiasing_averages_fine_detail():
    stripes = np.tile([0.0, 1.0], (256, 128))  # 1-px vertical stripes
    out = normalized(stripes, size=32, aspect="stretch")
    np.testing.assert_allclose(out, 0.5, atol=0.02)  # not aliased to 0s and 1s


def test_accepts_decoded_dict_and_array_forms():
    img = RNG.random((40, 30)).astype(np.float32)
    from_dict = normalized({"pixels": img, "format": "png"}, size=16)
    assert np.array_equal(from_dict, normalized(img, size=16))
    u8 = (img * 255).astype(np.uint8)
    np.testing.assert_allclose(normalized(u8, size=16), normalized(u8 / 255.0, size=16), atol=1e-6)
    assert normalized(np.ones((8, 8), bool), size=8).min() == 1.0
    same = normalized(img[:16, :16], size=16)
    np.testing.assert_array_equal(same, img[:16, :16])  # already that size: unchanged
    assert normalized(np.full((5, 5), 3.0), size=4).max() == 1.0  # clipped


@pytest.mark.parametrize(
    "bad", [np.zeros((0, 5)), np.zeros((4, 4, 3)), np.array([1.0, np.nan]).reshape(1, 2)]
)
def test_bad_images_raise_item_error(bad):
    with pytest.raises(ItemError):
        normalized(bad)


def test_bad_parameters():
    with pytest.raises(ValueError):
        normalized(np.zeros((4, 4)), aspect="fit")
    with pytest.raises(ValueError):
        normalized(np.zeros((4, 4)), size=0)


def test_deterministic():
    img = RNG.random((517, 389))
    for aspect in ("pad", "crop", "stretch"):
        a = normalized(img, size=64, aspect=aspect)
        b = normalized(img.copy(), size=64, aspect=aspect)
        assert a.tobytes() == b.tobytes()
