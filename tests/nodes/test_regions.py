"""The regions rule (overlapping tiles, each the BoVW of its superpixels), the region
index, and the box geometry between source and normalized pixels."""

from __future__ import annotations

import numpy as np
import pytest

from flow import Items
from flow.keys import key
from nodes.bovw import bovw_histogram, descriptors, vocabulary
from nodes.normalize import normalized
from nodes.regions import (
    RegionSearcher,
    box_vector,
    from_normalized,
    region_index,
    regions,
    tiles,
    to_normalized,
)


def _image(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = (
        0.5
        + 0.2 * np.sin(12 * xx + seed) * np.cos(9 * yy)
        + 0.05 * rng.standard_normal((size, size))
    )
    img[int(0.6 * size) :, : int(0.4 * size)] += 0.3  # a bright patch low left
    return np.clip(img, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def fitted():
    imgs = [_image(s) for s in range(6)]
    descs = [descriptors.fn(im, n_segments=60, patch=8) for im in imgs]
    voc = vocabulary.fn(
        Items([f"i{i}" for i in range(6)], [key(i) for i in range(6)], descs), words=12, sample=2000
    )
    return imgs, descs, voc


def test_tiles_cover_the_image_in_a_documented_lattice():
    t = tiles(64, 3, 0.5)
    assert t.shape == (9, 4)
    assert t[0].tolist() == [0, 0, 32, 32] and t[-1].tolist() == [32, 32, 64, 64]
    assert t[4].tolist() == [16, 16, 48, 48]  # the middle tile, half a tile off each side
    # every pixel is in 1 to 4 tiles; any 16 x 16 box lies inside at least one tile
    cover = np.zeros((64, 64), int)
    for x0, y0, x1, y1 in t.astype(int):
        cover[y0:y1, x0:x1] += 1
    assert cover.min() == 1 and cover.max() == 4
    for x in range(0, 49, 3):
        for y in range(0, 49, 3):
            assert any(a <= x and b <= y and x + 16 <= c and y + 16 <= d for a, b, c, d in t)
    assert tiles(10, 1, 1.0).tolist() == [[0, 0, 10, 10]]
    with pytest.raises(ValueError):
        tiles(64, 0, 0.5)


def test_a_box_holding_every_superpixel_is_the_whole_image_histogram(fitted):
    _, descs, voc = fitted
    whole, n = box_vector(descs[0], voc, (0, 0, 64, 64))
    assert n == len(descs[0]["descriptors"])
    np.testing.assert_allclose(whole, bovw_histogram.fn(descs[0], voc), atol=1e-6)
    empty, n = box_vector(descs[0], voc, (-10, -10, -5, -5))
    assert n == 0 and not empty.any()


def test_regions_are_the_tiles_described_by_their_superpixels(fitted):
    imgs, descs, voc = fitted
    dec = {"pixels": np.zeros((200, 100), np.float32), "study": "abc"}
    out = regions.fn(dec, imgs[1], descs[1], voc)
    assert out["shape"].tolist() == [200, 100] and out["study"] == "abc"
    assert out["vectors"].shape == (len(out["boxes"]), 12) and len(out["boxes"]) == 9
    for box, vec in zip(out["boxes"], out["vectors"]):
        want, _ = box_vector(descs[1], voc, box)
        np.testing.assert_array_equal(vec, want)
    # a tile with too few superpixel centres is not a region
    sparse = regions.fn(dec, imgs[1], descs[1], voc, min_descriptors=10_000)
    assert sparse["boxes"].shape == (0, 4) and sparse["vectors"].shape == (0, 12)


def test_region_index_finds_the_region_a_box_came_from(fitted, tmp_path):
    imgs, descs, voc = fitted
    dec = {"pixels": np.zeros((64, 64), np.float32), "study": ""}
    values = [regions.fn(dec, im, d, voc) for im, d in zip(imgs, descs)]
    ids = [f"i{i}" for i in range(6)]
    out = region_index.fn(Items(ids, [key(i) for i in ids], values), trees=10)
    assert out["count"] == 6 and out["regions"] == sum(len(v["boxes"]) for v in values)
    again = region_index.fn(Items(ids, [key(i) for i in ids], values), trees=10)
    assert again["annoy"].data == out["annoy"].data and again["table"].data == out["table"].data
    (tmp_path / "a").write_bytes(out["annoy"].data)
    (tmp_path / "t.npz").write_bytes(out["table"].data)
    s = RegionSearcher(str(tmp_path / "a"), str(tmp_path / "t.npz"), out["dim"])
    vec = values[2]["vectors"][4]
    hits = s.search(vec, 3)
    item, row, d = hits[0]
    assert item == 2 and d == pytest.approx(0, abs=1e-5)
    assert s.boxes[row].tolist() == values[2]["boxes"][4].tolist()
    # one result per item (no study): three different items
    assert len({h[0] for h in hits}) == 3
    assert all(h[0] != 2 for h in s.search(vec, 3, exclude={2}))


@pytest.mark.parametrize("aspect", ["pad", "crop", "stretch"])
@pytest.mark.parametrize("shape", [(200, 100), (100, 300), (64, 64)])
def test_boxes_map_to_normalized_pixels_and_back(aspect, shape):
    box = (shape[1] // 4, shape[0] // 5, shape[1] // 3, shape[0] // 3)
    if aspect == "crop":  # stay inside the centred square that crop keeps
        side = min(shape)
        box = ((shape[1] - side) // 2 + 5, (shape[0] - side) // 2 + 5, 20, 25)
    n = to_normalized(box, shape, 64, aspect)
    back = from_normalized(n, shape, 64, aspect)
    assert np.allclose(back, box, atol=1.01)
    # the normalize node puts the same pixel where the mapping says
    img = np.zeros(shape, np.float32)
    img[box[1] : box[1] + box[3], box[0] : box[0] + box[2]] = 1.0
    out = normalized.fn(img, size=64, aspect=aspect)
    ys, xs = np.nonzero(out > 0.5)
    assert abs(xs.min() - n[0]) <= 1.5 and abs(ys.min() - n[1]) <= 1.5
    assert abs(xs.max() + 1 - n[2]) <= 1.5 and abs(ys.max() + 1 - n[3]) <= 1.5
