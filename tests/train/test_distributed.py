"""torchrun: two gloo processes train the same fine-tune as one process, as one run."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from bakeoff.common import shards
from bakeoff.common.distributed import World, bounds, writer_rows
from bakeoff.train.features import FeatureStore, Target, _progress
from tests.conftest import TINY_CACHE, TINY_MODELS, tiny_options

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("n,size", [(0, 2), (1, 2), (7, 2), (8, 3), (35165, 4)])
def test_parts_cover_the_rows_once_in_order(n, size):
    parts = [bounds(n, size, r) for r in range(size)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in pairwise(parts))
    assert [hi - lo for lo, hi in parts] == [len(a) for a in np.array_split(np.arange(n), size)]


def test_a_world_of_one_needs_no_process_group():
    w = World()
    assert w.main and not w.distributed and w.part(5) == (0, 5)
    x = np.arange(6).reshape(3, 2)
    assert w.gather(x) is x and w.broadcast({"a": 1}) == {"a": 1} and w.mean(2.5) == 2.5
    w.barrier()


def test_machines_write_whole_shards_and_their_ranks_share_them():
    def parts(n, unit, machines, size):
        return [writer_rows(n, unit, r, machines, size) for r in range(size)]

    assert parts(10, 4, [0], 4) == [bounds(10, 4, r) for r in range(4)]  # one machine: rows, whatever the shards
    assert parts(20, 4, [0, 2], 4) == [(0, 6), (6, 12), (12, 16), (16, 20)]  # shards 0-2 | 3-4
    assert parts(20, 4, [0, 3], 5) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]  # 3 ranks, then 2
    assert parts(10, 16, [0, 2], 4) == [(0, 5), (5, 10), (10, 10), (10, 10)]  # one shard: the first machine


def test_each_rank_keeps_its_own_extraction_progress(tmp_path):
    target = Target(FeatureStore(tmp_path, "k"), ("features",))
    (tmp_path / "k").mkdir()
    path, state = _progress(target, 10, World(rank=1, size=2), (5, 10))
    assert path.name == "progress.1-of-2.json" and (state["lo"], state["hi"], state["done"]) == (5, 10, 5)
    path.write_text(json.dumps(state | {"done": 8}))
    assert _progress(target, 10, World(rank=1, size=2), (5, 10))[1]["done"] == 8  # resumed
    assert _progress(target, 10, World(rank=1, size=2), (4, 10))[1]["done"] == 4  # another split: starts over
    assert _progress(target, 10, World(), (0, 10))[0].name == "progress.json"


def _train(cmd: list[str], out: Path, data: Path) -> subprocess.CompletedProcess:
    name, size = TINY_MODELS["cnn"]
    args = ["--backbone", "cnn", "--strategy", "ft", "--data", str(data), "--out", str(out), "--model", name,
            "--weights", "random", "--image-size", str(size), "--cache-size", str(TINY_CACHE), "--epochs", "2",
            "--batch-size", "32", "--trials", "1", "--device", "cpu", "--no-progress"]
    proc = subprocess.run([sys.executable, *cmd, "-m", "bakeoff.train", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _history(run_dir: Path) -> dict[tuple[int, int], dict]:
    recs = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    keyed = {(r.get("trial", r.get("run")), r["epoch"]): r for r in recs}
    assert len(keyed) == len(recs)  # each epoch logged once, not once per rank
    return keyed


def test_torchrun_two_processes_train_as_one(tiny_data, tmp_path):
    from bakeoff.train.run import train_pair

    one, two = tmp_path / "one", tmp_path / "two"
    train_pair(tiny_data, one, tiny_options("cnn", "probe"))  # LP-then-FT starts both from the same head
    shutil.copytree(one / "cnn-probe", two / "cnn-probe")
    _train([], one, tiny_data)
    proc = _train(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], two, tiny_data)

    assert proc.stderr.count("cnn-ft: done in") == 1, proc.stderr  # one job, one voice
    cfg1, cfg2 = (json.loads((o / "cnn-ft" / "config.json").read_text()) for o in (one, two))
    assert (cfg1["world_size"], cfg2["world_size"]) == (1, 2)
    assert cfg2["distributed"]["backend"] == "gloo" and cfg2["status"] == "complete"
    assert cfg2["init_head"]["kind"] == "probe"
    # the ranks shared the trunk extraction: the same store, every row filled, marked complete by rank 0 only
    (store1,), (store2,) = (list((o / ".cache").glob("trunk-*")) for o in (one, two))
    assert store1.name == store2.name and json.loads((store2 / "meta.json").read_text())["ranks"] == 2
    t1, t2 = np.asarray(shards.load(store1 / "trunk")), np.asarray(shards.load(store2 / "trunk"))
    np.testing.assert_allclose(t2.astype(np.float32), t1.astype(np.float32), atol=2e-2, rtol=1e-2)
    # the same schedule and, within float rounding, the same model: DDP on slices of the one-process batches
    # (bf16 autocast rounds differently for 16- than for 32-image batches, and the gradient all-reduce sums in
    # another order; on 48 validation images the differences stay well under 0.02 mAP)
    h1, h2 = _history(one / "cnn-ft"), _history(two / "cnn-ft")
    assert h1.keys() == h2.keys() == {("final", 1), ("final", 2)}
    for k in h1:
        assert h2[k]["lr"] == h1[k]["lr"]
        assert abs(h2[k]["val_map"] - h1[k]["val_map"]) < 0.02, (k, h1[k], h2[k])
        assert abs(h2[k]["train_loss"] - h1[k]["train_loss"]) < 0.02 * h1[k]["train_loss"], (k, h1[k], h2[k])
    assert abs(cfg2["summary"]["result"]["best_val_map"] - cfg1["summary"]["result"]["best_val_map"]) < 0.02


def test_torchrun_ranks_share_the_image_cache(tiny_data, tmp_path):
    from bakeoff.train.data.cache import build_cache, cache_paths, load_cache
    from bakeoff.train.data.dataset import load_dataset

    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(tiny_data, d, ignore=shutil.ignore_patterns("cache"))
    build_cache(load_dataset(one), 24, workers=1, progress=False, chunk_rows=16)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "tests.train.distcache", str(two), "24", "16"], capture_output=True, text=True,
                          cwd=REPO, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ds1, ds2 = load_dataset(one), load_dataset(two)
    np.testing.assert_array_equal(np.asarray(load_cache(ds2, 24)), np.asarray(load_cache(ds1, 24)))
    h1, h2 = (json.loads(cache_paths(ds, 24)[1].read_text()) for ds in (ds1, ds2))
    assert h2["complete"] and h2["contents"] == h1["contents"]  # the same bytes decoded per chunk
    assert h2["built_by"] == [0] * 8 + [1] * 7 and h1["built_by"] == [0] * 15  # 15 chunks: each rank decoded its half
    assert not list((two / "cache").glob("images_24.rank*"))  # the ranks' records are folded into the header

    # a job stopped after rank 1 recorded its chunks but before rank 0 folded them: the rerun keeps them
    header, files = cache_paths(ds2, 24)[1], list((two / "cache" / "images_24").glob("shard-*.npy"))
    stamps = [f.stat().st_mtime_ns for f in files]
    (two / "cache" / "images_24.rank1-of-2.json").write_text(json.dumps(
        {"chunks": {str(k): [h2["chunks"][k], h2["contents"][k], 1] for k in range(8, 15)}}))
    header.write_text(json.dumps(h2 | {"complete": False, **{f: h2[f][:8] + [None] * 7 for f in
                                                             ("chunks", "contents", "built_by")}}))
    assert subprocess.run(proc.args, capture_output=True, cwd=REPO, timeout=600, check=False).returncode == 0
    h3 = json.loads(header.read_text())
    assert h3["complete"] and h3["built_by"] == h2["built_by"] and h3["contents"] == h1["contents"]
    assert [f.stat().st_mtime_ns for f in files] == stamps  # nothing decoded again


def test_torchrun_evaluation_shares_the_test_images(tiny_runs, tiny_data, tmp_path):
    from bakeoff.evaluate.score import evaluate_run

    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        shutil.copytree(tiny_runs / "cnn-probe", out / "cnn-probe")
    m1 = evaluate_run(one / "cnn-probe", tiny_data, "torch", device="cpu")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "bakeoff.evaluate", "--runs", str(two), "--data", str(tiny_data), "--runtime", "torch",
                           "--device", "cpu", "--batch-size", "16"], capture_output=True, text=True, cwd=REPO,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count("cnn-probe (torch") == 1, proc.stderr  # rank 0 alone reports (and writes)
    m2 = json.loads((two / "cnn-probe/eval/torch/metrics.json").read_text())
    p1, p2 = (np.load(o / "cnn-probe/eval/torch/predictions.npy") for o in (one, two))
    assert p2.shape == p1.shape and len(p1) == m1["test"]["n_images"]
    np.testing.assert_allclose(p2, p1, atol=1e-5)  # fp32, each image scored once, rows back in test order
    assert m2["macro_f1"] == pytest.approx(m1["macro_f1"], abs=1e-9) and m2["test"] == m1["test"]
