"""engines.bench: statistics, the measuring loop (fake clock), benchmark records, trtexec text, JSON, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engines.__main__ import main
from engines.bench import (bench_pair, bench_runner, format_trtexec, is_t4, latency_path, latency_stats,
                           measure)
from engines.runners import Runner


class FakeClock:
    """Time advances only when the benchmarked function runs."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeRunner(Runner):
    name, device, precision = "fake", "Fake GPU", "fp16"

    def __init__(self, clock: FakeClock, gpu: bool = False):
        self.clock, self.gpu, self.calls = clock, gpu, []
        self.config = {"preprocess": {"img_size": 4}}

    def predict(self, batch):
        self.calls.append(batch.shape)
        self.last = batch
        self.clock.t += 0.001 * len(batch)  # 1 ms per image
        if self.gpu:
            self.last_timing = {"gpu_compute_ms": float(len(self.calls)), "host_latency_ms": 0.8 * len(batch)}
        return np.zeros((len(batch), 3), np.float32)


def test_latency_stats_match_numpy():
    x = np.random.default_rng(0).gamma(2.0, 3.0, size=997)
    s = latency_stats(x)
    assert s["min"] == pytest.approx(x.min(), abs=1e-4) and s["max"] == pytest.approx(x.max(), abs=1e-4)
    assert s["mean"] == pytest.approx(x.mean(), abs=1e-4) and s["median"] == pytest.approx(np.median(x), abs=1e-4)
    for key, q in (("p90", 90), ("p95", 95), ("p99", 99)):
        assert s[key] == pytest.approx(np.percentile(x, q), abs=1e-4)
    with pytest.raises(ValueError, match="no latency samples"):
        latency_stats([])


def test_measure_warms_up_by_duration_then_meets_both_minimums():
    clock = FakeClock()
    calls = []

    def fn():
        calls.append(clock.t)
        clock.t += 0.1

    samples = measure(fn, warmup_s=0.5, min_duration_s=1.0, min_iters=3, clock=clock)
    assert len(calls) - len(samples) == 5  # warm-up: 5 calls of 100 ms fill 0.5 s, none of them timed
    assert len(samples) == 10 and samples == pytest.approx([100.0] * 10)  # the duration sets the count
    clock.t = 0.0
    assert len(measure(fn, warmup_s=0.0, min_duration_s=1.0, min_iters=25, clock=clock)) == 25  # the count does


def test_measure_times_sync_inside_each_iteration():
    clock = FakeClock()

    def sync():
        clock.t += 0.002

    samples = measure(lambda: None, warmup_s=0.0, min_duration_s=0.0, min_iters=4, sync=sync, clock=clock)
    assert samples == pytest.approx([2.0] * 4)


def test_bench_runner_records_each_batch():
    clock = FakeClock()
    runner = FakeRunner(clock)
    result = bench_runner(runner, [1, 4], warmup_s=0.01, duration_s=0.05, min_iters=5, clock=clock)
    assert runner.calls[0] == (1, 3, 4, 4)  # random inputs at the run's img_size
    b1, b4 = result["batches"]
    assert b1["iterations"] == 50 and b4["iterations"] == 13
    assert b4["throughput_ips"] == pytest.approx(4 * 13 / b4["duration_s"], rel=1e-3)
    assert b4["latency_ms"]["median"] == pytest.approx(4.0)
    assert b4["gpu_compute_ms"] is None and b4["host_latency_ms"] is None
    assert result["threads"] is None and result["is_t4"] is False and result["warmup_s"] == 0.01


def test_bench_runner_gpu_timings_exclude_warmup_and_real_inputs_are_tiled():
    clock = FakeClock()
    runner = FakeRunner(clock, gpu=True)
    images = torch.arange(3 * 3 * 4 * 4, dtype=torch.float32).reshape(3, 3, 4, 4)
    result = bench_runner(runner, [5], warmup_s=0.02, duration_s=0.0, min_iters=3, inputs=images, clock=clock)
    (row,) = result["batches"]
    assert torch.equal(runner.last, torch.cat([images, images[:2]]))  # 3 real images tiled to a batch of 5
    assert row["iterations"] == 3 and len(runner.calls) == 4 + 3  # four 5 ms warm-up calls fill 0.02 s
    assert row["gpu_compute_ms"]["min"] == 5.0 and row["gpu_compute_ms"]["max"] == 7.0  # calls 5-7: no warm-up
    assert row["host_latency_ms"]["max"] == pytest.approx(4.0)


def test_format_trtexec_has_trtexec_fields():
    clock = FakeClock()
    result = bench_runner(FakeRunner(clock, gpu=True), [2], warmup_s=0.0, duration_s=0.0, min_iters=3, clock=clock)
    text = format_trtexec(result)
    for field in ("=== Performance summary ===", "Throughput:", "qps", "images/s", "Latency: min = ", "max = ",
                  "mean = ", "median = ", "percentile(90%) = ", "percentile(95%) = ", "percentile(99%) = ",
                  "GPU Compute Time: min = ", "Host Latency", "Total Host Walltime:"):
        assert field in text, field
    assert "ESTIMATE" not in text


def test_is_t4():
    assert is_t4("Tesla T4") and is_t4("NVIDIA T4 via TensorrtExecutionProvider")
    assert not is_t4("NVIDIA H200") and not is_t4("Intel(R) Xeon(R) (2 threads)") and not is_t4("GT40")


def test_bench_pair_writes_the_latency_json(run_onnx):
    result = bench_pair(run_onnx, "onnxruntime", [1, 3], warmup_s=0.0, duration_s=0.0, min_iters=3,
                        project_to="t4", threads=1)
    path = latency_path(run_onnx, "onnxruntime", "fp32")
    assert path.name == "onnxruntime.json" and not list(path.parent.glob(".*.tmp"))  # atomic: no temp files left
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("runtime", "precision", "device", "is_t4", "threads", "batches", "warmup_s", "model", "date",
                "versions", "estimate", "input", "load_average_1m"):
        assert key in saved, key
    assert saved["threads"] == 1 and saved["is_t4"] is False and saved["input"] == "random normal, seed 0"
    assert saved["model"]["params"] > 0 and saved["model"]["flops_per_image"] > 0
    assert saved["versions"]["onnxruntime"]
    for row, b in zip(saved["batches"], (1, 3)):
        assert row["batch"] == b and row["iterations"] == 3 and row["gpu_compute_ms"] is None
        assert set(row["latency_ms"]) == {"min", "mean", "median", "p90", "p95", "p99", "max"}
    est = saved["estimate"]
    assert est["label"] == "ESTIMATE (not measured)" and [r["batch"] for r in est["batches"]] == [1, 3]
    assert "ESTIMATE (not measured)" in format_trtexec(saved)


def test_bench_pair_on_test_images_names_its_precision(run_onnx, tiny_data):
    result = bench_pair(run_onnx, "onnxruntime", [2], precision="fp16", warmup_s=0.0, duration_s=0.0,
                        min_iters=2, data=tiny_data, threads=1)
    assert latency_path(run_onnx, "onnxruntime", "fp16").name == "onnxruntime-fp16.json"
    assert latency_path(run_onnx, "onnxruntime", "fp16").exists()
    assert result["input"].startswith("first 2 test images of") and result["estimate"] is None


def test_cli_benchmarks_and_reports_runs_it_cannot(runs_onnx, capsys):
    code = main(["bench", "--runs", str(runs_onnx), "--runtime", "onnxruntime", "--batch", "1,2", "--warmup", "0",
                 "--duration", "0", "--iterations", "2", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 1  # cnn-ft has no export
    assert out.count("=== Performance summary ===") == 1 and "wrote " in out
    assert "SKIP cnn-ft" in err and "python -m export --runs" in err
    assert main(["bench", "--runs", str(runs_onnx), "--runtime", "torch", "--pairs", "cnn-probe", "--batch", "1",
                 "--warmup", "0", "--duration", "0", "--iterations", "2", "--device", "cpu"]) == 0
    assert (runs_onnx / "cnn-probe" / "latency" / "torch.json").exists()
