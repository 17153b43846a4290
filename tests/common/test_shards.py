"""common.shards: shard arithmetic, no file above the limit, reads equal a plain array's, writers touch only their
shards, an earlier version's single .npy file is a one-shard array."""
import os

import numpy as np
import pytest

from bakeoff.common import shards
from bakeoff.common.shards import HEADER, HEADER_ROOM

ROW = (4, 5)  # float16 rows of 40 bytes


@pytest.fixture
def limit(monkeypatch):
    """A shard limit of the header room + 7 rows of 40 bytes (+ change): 7 rows per shard."""
    monkeypatch.setenv(shards.ENV, str(HEADER_ROOM + 7 * 40 + 13))


def filled(path, n=30, **kw):
    """A sharded float16 array of ``n`` rows filled with its row numbers, and the plain array it holds."""
    plain = np.arange(n * 20, dtype=np.float16).reshape(n, *ROW)
    a = shards.create(path, plain.shape, np.float16, **kw)
    with a.writer(0, n) as w:
        w[0:n] = plain
    return shards.load(path), plain


@pytest.mark.parametrize("text, value", [("", 1 << 30), ("123", 123), ("64K", 64 << 10), ("64m", 64 << 20),
                                         ("2G", 2 << 30)])
def test_shard_bytes_from_the_environment(monkeypatch, text, value):
    monkeypatch.setenv(shards.ENV, text)
    assert shards.shard_bytes() == value


def test_a_bad_shard_limit_says_which_setting(monkeypatch):
    monkeypatch.setenv(shards.ENV, "1.5G")
    with pytest.raises(ValueError, match=r"\$BAKEOFF_SHARD_BYTES='1.5G'"):
        shards.shard_bytes()


def test_rows_per_shard():
    assert shards.rows_per_shard(40, limit=HEADER_ROOM + 7 * 40 + 39) == 7
    assert shards.rows_per_shard(40, multiple=3, limit=HEADER_ROOM + 7 * 40) == 6  # whole blocks of 3 rows
    rows = shards.rows_per_shard(12288, multiple=512)  # 64 x 64 x 3 images in 512-image chunks, 1 GiB
    assert rows % 512 == 0 and HEADER_ROOM + rows * 12288 <= 1 << 30 < HEADER_ROOM + (rows + 512) * 12288
    with pytest.raises(ValueError, match="holds no block of 8 rows of 40 bytes"):
        shards.rows_per_shard(40, multiple=8, limit=HEADER_ROOM + 7 * 40)


def test_no_file_above_the_limit_and_a_partial_last_shard(tmp_path, limit):
    a, plain = filled(tmp_path / "x")
    header = (tmp_path / "x" / HEADER).read_text()
    files = sorted((tmp_path / "x").glob("shard-*.npy"))
    assert [f.name for f in files] == [f"shard-{k:05d}.npy" for k in range(5)] and len(a.files) == 5
    assert max(f.stat().st_size for f in files) <= shards.shard_bytes()
    assert a.rows_per_shard == 7 and '"shard_bytes": 4389' in header
    assert [np.load(f, mmap_mode="r").shape[0] for f in files] == [7, 7, 7, 7, 2]  # each a plain .npy file
    assert np.array_equal(np.load(files[4]), plain[28:])


def test_reads_equal_a_plain_arrays(tmp_path, limit):
    a, plain = filled(tmp_path / "x")
    rng = np.random.default_rng(0)
    assert len(a) == 30 and a.shape == plain.shape and a.dtype == np.float16
    for idx in (rng.permutation(30), rng.integers(0, 30, 50), np.array([5, 5, 5, 29, 0, 6, 7]), [-1, -30, 3], [],
                np.arange(30) % 3 == 0):
        got = a[idx]
        assert type(got) is np.ndarray and np.array_equal(got, plain[idx]) and got.shape == plain[idx].shape
    for key in (slice(None), slice(3, 17), slice(6, 8), slice(-5, None), slice(20, 10), slice(1, 29, 4)):
        assert np.array_equal(np.asarray(a[key]), plain[key])
    view = a[5:23]  # a view: nothing read, indexed in its own positions
    assert len(view) == 18 and np.array_equal(view[[0, 17, 3]], plain[5:23][[0, 17, 3]])
    assert np.array_equal(view[2:4][[1, 0]], plain[[8, 7]]) and np.array_equal(view[-1], plain[22])
    assert np.array_equal(a[7], plain[7]) and np.array_equal(a[np.int64(29)], plain[29])
    assert np.array_equal(np.asarray(a, dtype=np.float32), plain.astype(np.float32))
    assert [r.tolist() for r in a[26:]] == [r.tolist() for r in plain[26:]]  # iteration
    for bad in (30, -31, [0, 30]):
        with pytest.raises(IndexError):
            a[bad]
    with pytest.raises(IndexError, match="integers"):
        a[np.array([[0, 1]])]


def test_a_read_opens_each_shard_once_and_reads_runs_whole(tmp_path, limit, monkeypatch):
    a, _ = filled(tmp_path / "x")
    opened, reads = [], []
    real_open, real_read = os.open, os.preadv
    monkeypatch.setattr(os, "open", lambda f, *m: (opened.append(os.path.basename(f)), real_open(f, *m))[1])
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: (reads.append(len(bufs[0])), real_read(fd, bufs, off))[1])
    a[[13, 0, 8, 1, 2, 9, 12, 3, 6, 7, 2]]  # runs 0-3, 6 | 7-9 (a shard boundary), 12-13
    assert opened == ["shard-00000.npy", "shard-00001.npy"] and reads == [4 * 40, 1 * 40, 3 * 40, 2 * 40]


def test_a_writer_opens_only_the_shards_it_writes(tmp_path, limit):
    a, plain = filled(tmp_path / "x")
    with a.writer(14, 21) as w:  # exactly shard 2
        w[14:21] = -plain[14:21]
        w[16] = 0
        assert list(w.fds) == [2]
        with pytest.raises(IndexError, match="outside this writer's 14:21"):
            w[13:15] = 1
    assert w.fds == {}  # flushed and closed
    with a.writer(5, 9) as w:  # across a shard boundary
        w[5:9] = 7
        assert list(w.fds) == [0, 1]
    want = plain.copy()
    want[14:21], want[16], want[5:9] = -plain[14:21], 0, 7
    assert np.array_equal(np.asarray(shards.load(tmp_path / "x")), want)


def test_layout_does_not_change_the_content(tmp_path):
    small, plain = filled(tmp_path / "small", rows=3)
    big, _ = filled(tmp_path / "big")
    assert (len(small.files), len(big.files)) == (10, 1)
    assert np.asarray(small).tobytes() == np.asarray(big).tobytes() == plain.tobytes()


def test_create_replaces_an_array_and_an_earlier_single_file(tmp_path, limit):
    filled(tmp_path / "x")
    np.save(tmp_path / "x.npy", np.zeros((2, 3)))
    a = shards.create(tmp_path / "x", (3, *ROW), np.float16)
    assert len(a.files) == 1 and {p.name for p in (tmp_path / "x").iterdir()} == {HEADER, "shard-00000.npy"}
    assert not (tmp_path / "x.npy").exists() and not np.asarray(a).any()  # zero-filled (a sparse file)


def test_an_earlier_versions_single_file_is_one_shard(tmp_path, limit):
    plain = np.arange(60, dtype=np.uint8).reshape(20, 3)
    np.save(tmp_path / "old.npy", plain)  # above the limit: kept as it is
    assert shards.exists(tmp_path / "old") and not shards.exists(tmp_path / "new")
    a = shards.load(tmp_path / "old")
    assert a.files == (tmp_path / "old.npy",) and a.rows_per_shard == 20
    assert np.array_equal(a[[19, 0]], plain[[19, 0]])
    with a.writer(0, 20) as w:  # resumed or refreshed in place
        w[3] = 9
    assert np.load(tmp_path / "old.npy")[3].tolist() == [9, 9, 9]
    with pytest.raises(FileNotFoundError, match="no array here"):
        shards.load(tmp_path / "new")


def test_a_shard_of_the_wrong_shape_is_refused(tmp_path, limit):
    filled(tmp_path / "x")
    np.save(tmp_path / "x" / "shard-00001.npy", np.zeros((6, *ROW), np.float16))
    with pytest.raises(ValueError, match=r"shard-00001.npy: holds \(6, 4, 5\) float16, expected \(7, 4, 5\)"):
        shards.load(tmp_path / "x")
