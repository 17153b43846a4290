import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from bakeoff.common import shards
from bakeoff.common.io import read_json
from bakeoff.train.data.cache import (
    CacheError,
    border_colour,
    build_cache,
    cache_paths,
    cache_status,
    load_cache,
    resize_batch,
)
from bakeoff.train.data.dataset import DatasetError, load_dataset, write_dataset

S = 16
GREEN, RED = (10, 200, 30), (220, 20, 40)


def tall_image():
    """8 wide x 16 high: a 1-px GREEN border around RED; padded to 16 x 16 with GREEN."""
    a = np.empty((16, 8, 3), dtype=np.uint8)
    a[:] = GREEN
    a[1:-1, 1:-1] = RED
    return a


@pytest.fixture
def images(tmp_path):
    """Seven images of assorted sizes and modes; returns (dataset root, arrays written for rows 0 and 1)."""
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    d = tmp_path / "ds"
    (d / "img").mkdir(parents=True)
    Image.fromarray(square).save(d / "img/0.png")
    Image.fromarray(tall_image()).save(d / "img/1.png")
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(d / "img/2.png")  # transparent -> white
    Image.new("L", (20, 12), 77).save(d / "img/3.png")
    for i in range(4, 7):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(d / f"img/{i}.jpg", quality=90)
    paths = ["img/0.png", "img/1.png", "img/2.png", "img/3.png", "img/4.jpg", "img/5.jpg", "img/6.jpg"]
    write_dataset(d, [str(i) for i in range(7)], paths, [["a"]] * 7)
    return d, square


def build(root, **kw):
    """Build with 2-row chunks in-process; returns the chunks processed."""
    done = []
    build_cache(load_dataset(root), S, workers=kw.pop("workers", 1), progress=False, chunk_rows=2, on_chunk=done.append, **kw)
    return sorted(done)


def test_border_colour_is_border_median():
    a = tall_image()
    a[0, 0] = (0, 0, 0)  # one odd border pixel does not move the median
    assert border_colour(a) == GREEN


def test_build_and_load_round_trip(images):
    root, square = images
    ds = load_dataset(root)
    with pytest.raises(CacheError, match=r"missing.*python -m train.data cache"):
        load_cache(ds, S)
    assert build(root) == [0, 1, 2, 3]
    x = load_cache(ds, S)
    assert x.shape == (7, S, S, 3) and x.dtype == np.uint8 and isinstance(x, shards.ShardedArray)  # read-only
    assert np.array_equal(x[0], square)  # already S x S: stored as is
    assert np.array_equal(x[1], np.pad(tall_image(), ((0, 0), (4, 4), (0, 0)), mode="edge"))  # GREEN padding
    assert (x[2] == 255).all() and (x[3] == 77).all()
    header = read_json(cache_paths(ds, S)[1])
    assert header["complete"] and header["shape"] == [7, S, S, 3] and len(header["chunks"]) == 4
    assert "complete, 7 x 16 x 16 x 3" in cache_status(ds, S)
    assert build(root) == []  # current: nothing to do


def test_parallel_build_matches_serial(images):
    root, _ = images
    build(root)
    serial = np.array(load_cache(load_dataset(root), S))
    cache_paths(load_dataset(root), S)[1].unlink()
    assert build(root, workers=2) == [0, 1, 2, 3]
    assert np.array_equal(load_cache(load_dataset(root), S), serial)


def test_resume_after_interruption(images):
    root, _ = images

    def stop(k):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(load_dataset(root), S, workers=1, progress=False, chunk_rows=2, on_chunk=stop)
    ds = load_dataset(root)
    assert not read_json(cache_paths(ds, S)[1])["complete"]
    with pytest.raises(CacheError, match="incomplete: 1 of 4 chunks"):
        load_cache(ds, S)
    assert build(root) == [1, 2, 3]
    assert load_cache(ds, S).shape == (7, S, S, 3)


def test_a_tiny_shard_limit_gives_the_same_images_in_more_files(images, tmp_path, monkeypatch):
    """Shards hold whole chunks (2 rows here) and stay under the limit; an interrupted build resumes its chunks."""
    root, _ = images
    build(root)
    one = np.asarray(load_cache(load_dataset(root), S))
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("cache"))
    limit = shards.HEADER_ROOM + 5 * S * S * 3  # room for 5 rows: shards of 4 (2 chunks)
    monkeypatch.setenv(shards.ENV, str(limit))
    stops = []

    def stop(k):
        stops.append(k)
        if len(stops) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(load_dataset(copy), S, workers=1, progress=False, chunk_rows=2, on_chunk=stop)
    assert build(copy) == [2, 3]  # chunks 0 and 1 (shard 0) were done
    data = cache_paths(load_dataset(copy), S)[0]
    files = sorted(data.glob("shard-*.npy"))
    assert [np.load(f, mmap_mode="r").shape[0] for f in files] == [4, 3]
    assert max(f.stat().st_size for f in files) <= limit
    assert np.array_equal(np.asarray(load_cache(load_dataset(copy), S)), one)
    assert "in 2 files" in cache_status(load_dataset(copy), S)


def test_a_single_file_cache_of_an_earlier_version_is_read_and_refreshed(images):
    """Earlier versions wrote one images_<S>.npy: it stays usable, and stale chunks are rebuilt in it."""
    root, _ = images
    build(root)
    ds = load_dataset(root)
    data = cache_paths(ds, S)[0]
    want = np.asarray(load_cache(ds, S))
    shards.remove(data)
    np.save(data.with_suffix(".npy"), want)
    assert np.array_equal(load_cache(ds, S)[[6, 0]], want[[6, 0]])
    assert "in 1 file," in cache_status(ds, S)
    Image.new("RGB", (S, S), (1, 2, 3)).save(root / "img/5.jpg")
    assert build(root) == [2]
    assert not (data / shards.HEADER).exists()  # still the one file
    assert np.abs(np.load(data.with_suffix(".npy"))[5].astype(int) - (1, 2, 3)).max() <= 2


def test_changed_source_image_is_stale_and_only_its_chunk_rebuilt(images):
    root, _ = images
    build(root)
    Image.new("RGB", (S, S), (1, 2, 3)).save(root / "img/5.jpg")
    ds = load_dataset(root)
    with pytest.raises(CacheError, match="source images changed in 1 of 4 chunks"):
        load_cache(ds, S)
    assert "stale" in cache_status(ds, S)
    assert build(root) == [2]
    assert np.abs(load_cache(ds, S)[5].astype(int) - (1, 2, 3)).max() <= 2  # JPEG


def test_touched_source_image_is_verified_by_content_and_refreshed(images):
    root, _ = images
    build(root)
    ds = load_dataset(root)
    header_path = cache_paths(ds, S)[1]
    before = read_json(header_path)["chunks"]
    st = os.stat(root / "img/0.png")
    os.utime(root / "img/0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    assert load_cache(ds, S).shape == (7, S, S, 3)
    after = read_json(header_path)["chunks"]
    assert after[0] != before[0] and after[1:] == before[1:]  # stat fingerprint refreshed, bytes unchanged
    assert build(root) == []


def test_copied_dataset_without_mtimes_keeps_its_cache(images, tmp_path):
    """A dataset copied (or re-mounted) with fresh mtimes: every stat fingerprint differs, the bytes do not."""
    root, _ = images
    build(root)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, copy_function=shutil.copyfile)  # no mtimes carried over
    os.chmod(cache_paths(load_dataset(copy), S)[1], 0o444)  # a read-only header: verified on every load
    assert np.array_equal(load_cache(load_dataset(copy), S), load_cache(load_dataset(root), S))
    Image.new("RGB", (S, S), (1, 2, 3)).save(copy / "img/5.jpg")  # now one file's bytes change
    with pytest.raises(CacheError, match="source images changed in 1 of 4 chunks"):
        load_cache(load_dataset(copy), S)


def test_changed_manifest_is_stale(images):
    root, _ = images
    build(root)
    ds = load_dataset(root)
    images_ = ds.images[:]
    images_[6], images_[5] = images_[5], images_[6]  # swap two rows' images
    write_dataset(root, ds.ids, images_, ds.tags)
    with pytest.raises(CacheError, match="manifest's image list changed"):
        load_cache(load_dataset(root), S)
    assert build(root) == [2, 3]
    write_dataset(root, ds.ids[:6], ds.images[:6], ds.tags[:6])  # one row fewer
    with pytest.raises(CacheError, match=r"built for shape \[7, 16, 16, 3\], dataset needs \[6, 16, 16, 3\]"):
        load_cache(load_dataset(root), S)
    assert build(root) == [0, 1, 2]


def test_undecodable_image_names_row(images):
    root, _ = images
    (root / "img/4.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"row 5 \(id 4\): cannot decode image .*4\.jpg"):
        build(root)


def test_resize_batch():
    x = np.full((2, 12, 12, 3), 51, dtype=np.uint8)
    for size in (6, 12, 20):
        out = resize_batch(x, size)
        assert out.shape == (2, 3, size, size) and out.dtype == torch.float32
        assert torch.allclose(out, torch.full_like(out, 0.2))
    t = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8))
    assert torch.equal(resize_batch(t, 8), t.permute(0, 3, 1, 2).float() / 255)
    down = resize_batch(t, 4)
    assert torch.allclose(down.mean(dim=(2, 3)), resize_batch(t, 8).mean(dim=(2, 3)), atol=0.02)  # antialiased
    ro = np.full((1, 4, 4, 3), 255, dtype=np.uint8)
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resize_batch(ro, 4).max() == 1.0
