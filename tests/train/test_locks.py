"""Safety under concurrency: run-directory and cache locks between real processes (tests/train/lockworker.py), and
the fine-tune's explicit dependency on its probe's head."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bakeoff.common.lock import HOST, Locked, hold, holder
from bakeoff.train import run as R
from bakeoff.train.current import run_changes
from bakeoff.train.data.cache import load_cache
from bakeoff.train.data.dataset import load_dataset
from bakeoff.train.data.synth import generate
from bakeoff.train.features import FeatureStore
from bakeoff.train.registry import get_spec
from bakeoff.train.weights import create_backbone
from tests.conftest import tiny_options
from tests.train.lockworker import extract_into

REPO = Path(__file__).resolve().parents[2]
WAIT = 120  # seconds a worker may take (two cores shared with other jobs)


def worker(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.train.lockworker", *map(str, args)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def go(*procs: subprocess.Popen) -> None:
    """Start ``procs`` (each has said "ready") at once."""
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()


def first_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()
    assert line, f"worker said nothing: {proc.stderr.read()}"
    return line


def until_held(path: Path, proc: subprocess.Popen):
    """The record of ``proc`` once it holds the lock at ``path``."""
    deadline = time.monotonic() + WAIT
    while (rec := holder(path, seconds=0)) is None or rec.pid != proc.pid:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return rec


def finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.fixture
def stop():
    """Kill the workers a test registers, whatever the test's outcome."""
    procs: list[int] = []
    yield procs.append
    for pid in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_held_lock_is_refused_naming_its_holder(tmp_path, stop):
    lock = tmp_path / "pair" / ".lock"
    proc = worker("hold", lock, "training cnn-probe")
    stop(proc.pid)
    assert first_line(proc) == "held"
    with pytest.raises(Locked) as e, hold(lock, "a second training", wait=False):
        pass
    rec = e.value.holder
    assert (rec.pid, rec.host, rec.what) == (proc.pid, HOST, "training cnn-probe")
    assert "-m tests.train.lockworker hold" in rec.command and rec.since.endswith("Z")
    assert f"pid {proc.pid} on {HOST} since {rec.since} (training cnn-probe)" in str(e.value)


def test_a_dead_holders_lock_is_taken_over_and_its_record_replaced(tmp_path, stop):
    lock = tmp_path / ".lock"
    proc = worker("hold-fork", lock, "building")
    child = int(first_line(proc).rpartition(" ")[2])  # a forked child of the holder, still running
    stop(proc.pid), stop(child)
    proc.kill()
    proc.wait()
    os.kill(child, 0)  # alive: it does not keep its dead parent's lock
    assert json.loads(lock.read_text())["pid"] == proc.pid  # the dead holder's record is still there ...
    assert holder(lock, seconds=0.2) is None  # ... and never reported: it names no running process
    with hold(lock, "taking over", wait=False):
        assert holder(lock).pid == os.getpid()
    assert lock.read_text() == ""  # released: no record left to mislead


def test_two_writers_to_one_feature_store_build_it_once(tmp_path, stop):
    reference = extract_into(FeatureStore(tmp_path / "ref", "k"), delay=0)
    first, second = worker("extract", tmp_path, "features-k", 0.03), worker("extract", tmp_path, "features-k", 0)
    stop(first.pid), stop(second.pid)
    assert first_line(first) == first_line(second) == "ready"
    go(first)
    until_held(tmp_path / "features-k" / ".lock", first)
    go(second)
    (a, _), (b, said) = finish(first), finish(second)
    assert (a["built"], b["built"]) == (True, False)  # the second waited and reused the first's store
    assert f"waiting for pid {first.pid} on {HOST}" in said
    store = FeatureStore(tmp_path, "features-k")
    assert store.complete and a["sum"] == b["sum"] == float(reference.sum())
    np.testing.assert_array_equal(np.asarray(store.load("features"), np.float32), reference)


def test_a_writer_killed_halfway_is_resumed_by_the_next(tmp_path, stop):
    reference = extract_into(FeatureStore(tmp_path / "ref", "k"), delay=0)
    progress = tmp_path / "features-k" / "progress.json"
    first = worker("extract", tmp_path, "features-k", 0.05)
    stop(first.pid)
    assert first_line(first) == "ready"
    go(first)
    deadline = time.monotonic() + WAIT
    while not (progress.exists() and json.loads(progress.read_text())["done"] > 0):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    first.kill()
    first.wait()
    second = worker("extract", tmp_path, "features-k", 0)
    stop(second.pid)
    assert first_line(second) == "ready"
    go(second)
    got, _ = finish(second)
    assert got["built"] and got["resumed_from"] > 0  # took the dead writer's lock and resumed its rows
    np.testing.assert_array_equal(np.asarray(FeatureStore(tmp_path, "features-k").load("features"), np.float32),
                                  reference)


def test_two_builds_of_one_image_cache_build_it_once(tmp_path, stop):
    root = tmp_path / "data"
    generate(root, n_images=32, n_tags=16, seed=0, image_size=32, workers=1)
    first, second = worker("cache", root, 16, 0.3), worker("cache", root, 16, 0)
    stop(first.pid), stop(second.pid)
    assert first_line(first) == first_line(second) == "ready"
    go(first)
    until_held(root / "cache" / "images_16.lock", first)
    go(second)
    (a, _), (b, said) = finish(first), finish(second)
    assert (a["chunks"], b["chunks"]) == (4, 0) and f"waiting for pid {first.pid}" in said
    assert load_cache(load_dataset(root), 16).shape == (32, 16, 16, 3)


def test_a_run_directory_in_use_is_refused_naming_its_holder(tmp_path, stop):
    run_dir = tmp_path / "cnn-probe"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"status": "running"}')
    proc = worker("hold", run_dir / ".lock", "training cnn-probe")
    stop(proc.pid)
    assert first_line(proc) == "held"
    with pytest.raises(R.RunLocked, match=rf"{re.escape(str(run_dir))} is in use by pid {proc.pid} on {HOST} since "
                                          r".* \(training cnn-probe\): .*-m tests.train.lockworker hold"):
        R.train_pair(tmp_path / "no-data-needed", tmp_path, tiny_options("cnn", "probe"))
    assert (run_dir / "config.json").read_text() == '{"status": "running"}'  # left alone


def start_of(data: Path):
    """init_head for the tiny cnn fine-tune, as ``start(out, head)``: what it needs is made beforehand."""
    opts = tiny_options("cnn", "ft")
    spec = get_spec("cnn", opts.model, opts.image_size)
    winfo, ds = create_backbone(spec, "random")[1], load_dataset(data)
    return lambda out, head="field": R.init_head(out, spec, winfo, ds, head)


def test_a_fine_tune_waits_for_the_probe_another_process_trains(tiny_runs, tiny_data, tmp_path, stop, capsys, caplog):
    init_head = start_of(tiny_data)
    proc = worker("probe", tiny_runs / "cnn-probe", tmp_path / "cnn-probe", 2)
    stop(proc.pid)
    assert first_line(proc) == "held"
    start, record = init_head(tmp_path)
    assert record == {"kind": "probe", "probe_run": str((tmp_path / "cnn-probe").resolve())}
    assert f"waiting for pid {proc.pid} on {HOST}" in capsys.readouterr().err + caplog.text
    cfg = json.loads((tiny_runs / "cnn-probe" / "config.json").read_text())
    bias = load_file(str(tiny_runs / "cnn-probe" / "model.safetensors"))["head.bias"]
    torch.testing.assert_close(start[1], bias - torch.tensor(cfg["decision"]["bias_shift"], dtype=torch.float32))


def test_a_fine_tune_without_its_probe_says_so_and_records_a_zero_head(tiny_runs, tiny_data, tmp_path, capsys):
    init_head = start_of(tiny_data)
    start, record = init_head(tmp_path)
    assert start is None and record["kind"] == "zero"
    assert record["reason"] == f"no probe run in {tmp_path / 'cnn-probe'}"
    assert "WARNING cnn-ft: starts from a ZERO head, not from its linear probe's" in capsys.readouterr().out
    shutil.copytree(tiny_runs / "cnn-probe", tmp_path / "cnn-probe")
    start, record = init_head(tmp_path, head="sigmoid")
    assert start is None and record["reason"].endswith("was trained with another head field (this fine-tune: sigmoid)")


def test_a_zero_head_fine_tune_is_stale_once_its_probe_exists(tiny_runs, tiny_data, tmp_path):
    from bakeoff.train.__main__ import plan_run

    ft = json.loads((tiny_runs / "cnn-ft" / "config.json").read_text())
    assert ft["init_head"] == {"kind": "probe", "probe_run": str((tiny_runs / "cnn-probe").resolve())}
    probe_dir = tmp_path / "runs" / "cnn-probe"
    zero = ft | {"init_head": {"kind": "zero", "probe_run": str(probe_dir), "reason": "no probe run"}}
    opts = tiny_options("cnn", "ft")
    spec = get_spec("cnn", opts.model, opts.image_size)
    ds_hash = ft["dataset"]["hash"]
    assert run_changes(zero, opts, spec, "random", ds_hash) == []
    shutil.copytree(tiny_runs / "cnn-probe", probe_dir)
    stale = [f"init_head zero -> linear probe ({probe_dir} is complete now)"]
    assert run_changes(zero, opts, spec, "random", ds_hash) == stale
    assert run_changes(ft, opts, spec, "random", ds_hash) == []  # started from a probe: current
    run_dir = tmp_path / "runs" / "cnn-ft"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(zero | {"status": "running"}))
    assert plan_run(run_dir, opts, spec, "random", ds_hash, force=False) == (
        True, False, f"options changed since it was interrupted ({stale[0]}): starting over")


@pytest.mark.slow
def test_a_fine_tune_trained_without_its_probe_records_its_zero_start(tiny_data, tmp_path, capsys):
    run_dir = R.train_pair(tiny_data, tmp_path, tiny_options("cnn", "ft", epochs=1, trials=1))
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["init_head"]["kind"] == "zero" and cfg["summary"]["init_head"].startswith("zero weights")
    assert "WARNING cnn-ft: starts from a ZERO head" in capsys.readouterr().out
    assert (run_dir / ".lock").read_text() == ""  # released
