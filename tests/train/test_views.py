"""train.views: augmented views are deterministic per (seed, view, image), differ from the original, keep the
cache's shape and dtype, draw crops within the recipe, and never change colour."""
import math

import numpy as np

from bakeoff.train.views import RATIO, SCALE, ViewImages, view_of, view_params

IMAGES = np.random.default_rng(0).integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
ROWS = np.array([3, 0, 7, 11, 5])


def test_views_are_deterministic_per_seed_view_and_image():
    a = ViewImages(IMAGES, seed=0, view=1)[ROWS]
    assert a.dtype == np.uint8 and a.shape == (len(ROWS), 32, 32, 3)
    assert np.array_equal(a, ViewImages(IMAGES, seed=0, view=1)[ROWS])  # another instance, same views
    assert np.array_equal(a[::-1], ViewImages(IMAGES, 0, 1)[ROWS[::-1]])  # whatever the batch's order
    assert np.array_equal(a[2:3], ViewImages(IMAGES, 0, 1)[ROWS[2:3]])  # ... or its size
    assert not np.array_equal(a, ViewImages(IMAGES, 0, 2)[ROWS])  # another view
    assert not np.array_equal(a, ViewImages(IMAGES, 1, 1)[ROWS])  # another seed


def test_views_differ_from_the_original():
    rows = np.arange(len(IMAGES))
    views = ViewImages(IMAGES, 0, 1)[rows]
    for r in rows:
        box, flip = view_params(0, 1, int(r), 32)
        if box != (0, 0, 32, 32) or flip:
            assert not np.array_equal(views[r], IMAGES[r]), r
    assert sum(not np.array_equal(views[r], IMAGES[r]) for r in rows) >= len(rows) - 1


def test_crops_follow_the_recipe_and_half_are_flipped():
    size, flips = 224, 0
    for row in range(400):
        (top, left, h, w), flip = view_params(7, 1, row, size)
        flips += flip
        assert 0 <= top <= size - h and 0 <= left <= size - w
        if (h, w) != (size, size):  # not the fallback
            assert SCALE[0] - 0.01 <= h * w / size ** 2 <= SCALE[1]
            assert RATIO[0] * 0.98 <= w / h <= RATIO[1] * 1.02
    assert 0.4 <= flips / 400 <= 0.6


def test_whole_unflipped_crop_is_the_image_and_flip_mirrors_it():
    img = IMAGES[0]
    assert np.array_equal(view_of(img, (0, 0, 32, 32), False), img)
    assert np.array_equal(view_of(img, (0, 0, 32, 32), True), img[:, ::-1])
    crop = view_of(img, (8, 4, 16, 16), False)  # a 16 px crop resized back to 32 px
    assert crop.shape == img.shape and math.isclose(crop.mean(), img[8:24, 4:20].mean(), rel_tol=0.05)


def test_colour_is_never_changed():
    solid = np.empty((3, 32, 32, 3), dtype=np.uint8)
    solid[:] = np.array([[200, 30, 90], [0, 0, 0], [255, 255, 255]], dtype=np.uint8)[:, None, None, :]
    for view in (1, 2, 3):
        assert np.array_equal(ViewImages(solid, 0, view)[np.arange(3)], solid)
