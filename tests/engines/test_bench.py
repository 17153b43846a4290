"""bakeoff.engines.bench: trtexec statistics, the measuring loop (fake clock), benchmark records, trtexec text, JSON, CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from bakeoff.engines.__main__ import main
from bakeoff.engines.bench import (
    EVENT_LATENCY,
    WALL_LATENCY,
    bench_pair,
    bench_runner,
    busy_cpu_seconds,
    contention,
    format_trtexec,
    is_t4,
    latency_path,
    latency_stats,
    measure,
    median,
    percentile,
    summarize,
)
from bakeoff.engines.runners import Runner


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
            self.last_timing = {"h2d_ms": 0.1 * len(batch), "gpu_compute_ms": float(len(self.calls)),
                                "d2h_ms": 0.05, "enqueue_ms": 0.2}
        return np.zeros((len(batch), 3), np.float32)


TEN = [float(v) for v in range(1, 11)]


@pytest.mark.parametrize(("values", "p", "expected"), [
    (TEN, 90, 9.0),  # exclude floor(0.1 * 10) = 1 -> index 8 (float64 (1 - 0.9) * 10 would floor to 0)
    (TEN, 95, 10.0),  # exclude floor(0.5) = 0 -> index 9
    (TEN, 99, 10.0),
    (TEN, 50, 5.0),  # exclude 5 -> index 4
    (TEN, 0, 1.0),  # exclude 10 -> index max(-1, 0)
    (TEN, 100, 10.0),
    ([float(v) for v in range(1, 101)], 99, 99.0),  # exclude 1 -> index 98 (trtexec's float32 gives 100)
    ([float(v) for v in range(1, 101)], 95, 95.0),
    ([float(v) for v in range(1, 21)], 95, 19.0),  # exclude 1 -> index 18
    ([float(v) for v in range(1, 21)], 90, 18.0),  # exclude 2 -> index 17
    ([float(v) for v in range(1, 1001)], 99.9, 999.0),  # exclude 1 -> index 998
    ([7.0], 99, 7.0),
])
def test_percentile_is_trtexec_nearest_rank(values, p, expected):
    assert percentile(values, p) == expected


def test_percentile_does_not_interpolate_and_checks_its_range():
    assert percentile(TEN, 90) != pytest.approx(np.percentile(TEN, 90))  # numpy interpolates: 9.1
    with pytest.raises(ValueError, match="not in \\[0, 100\\]"):
        percentile(TEN, 101)


def test_median_averages_the_middle_pair():
    assert median([1.0, 2.0, 3.0]) == 2.0 and median([1.0, 2.0, 3.0, 10.0]) == 2.5 and median([4.0]) == 4.0


def test_latency_stats_sorts_then_applies_trtexec_rules():
    s = latency_stats([5, 1, 4, 2, 3, 10, 9, 8, 7, 6])
    assert s == {"min": 1.0, "mean": 5.5, "median": 5.5, "p90": 9.0, "p95": 10.0, "p99": 10.0, "max": 10.0}
    with pytest.raises(ValueError, match="no latency samples"):
        latency_stats([])


def test_measure_warms_up_by_duration_then_meets_both_minimums():
    clock = FakeClock()
    calls = []

    def fn():
        calls.append(clock.t)
        clock.t += 0.1

    spans = measure(fn, warmup_s=0.5, min_duration_s=1.0, min_iters=3, clock=clock)
    assert len(calls) - len(spans) == 5  # warm-up: 5 calls of 100 ms fill 0.5 s, none of them timed
    assert len(spans) == 10  # the duration sets the count
    assert spans[0][0] == pytest.approx(0.5) and spans[-1][1] == pytest.approx(1.5)
    assert [end - start for start, end in spans] == pytest.approx([0.1] * 10)
    clock.t = 0.0
    assert len(measure(fn, warmup_s=0.0, min_duration_s=1.0, min_iters=25, clock=clock)) == 25  # the count does
    assert len(measure(fn, warmup_s=0.0, min_duration_s=0.0, min_iters=0, clock=clock)) == 1


def test_measure_duration_is_walltime_not_summed_latency():
    class Ticking(FakeClock):
        """45 ms pass at every reading: the time between queries that no query's latency holds."""

        def __call__(self) -> float:
            self.t += 0.045
            return self.t - 0.045

    clock = Ticking()

    def fn():
        clock.t += 0.01

    spans = measure(fn, warmup_s=0.0, min_duration_s=0.5, min_iters=1, clock=clock)
    assert [end - start for start, end in spans] == pytest.approx([0.055] * 6)  # one query every 100 ms
    assert spans[-1][1] - spans[0][0] == pytest.approx(0.555)  # 0.5 s of wall time; summed latency: only 0.33 s


def test_summarize_cpu_queries_use_walltime_for_throughput():
    row = summarize(4, [(0.0, 0.010), (0.020, 0.030), (0.040, 0.060)], None)
    assert row["iterations"] == 3 and row["total_host_walltime_s"] == 0.06  # first start to last end
    assert row["throughput_qps"] == pytest.approx(50.0) and row["throughput_ips"] == pytest.approx(200.0)
    assert row["latency_ms"]["min"] == pytest.approx(10.0) and row["latency_ms"]["max"] == pytest.approx(20.0)
    assert row["wall_ms"] is None and row["total_gpu_compute_s"] is None
    assert all(row[k] is None for k in ("enqueue_ms", "h2d_ms", "gpu_compute_ms", "d2h_ms"))


def test_summarize_gpu_latency_is_h2d_plus_compute_plus_d2h():
    spans = [(0.0, 0.005), (0.005, 0.011)]
    timings = [{"h2d_ms": 0.5, "gpu_compute_ms": 2.0, "d2h_ms": 0.25, "enqueue_ms": 0.1},
               {"h2d_ms": 0.5, "gpu_compute_ms": 3.0, "d2h_ms": 0.25, "enqueue_ms": 0.3}]
    row = summarize(1, spans, timings)
    assert row["latency_ms"]["min"] == 2.75 and row["latency_ms"]["max"] == 3.75
    assert row["gpu_compute_ms"]["median"] == 2.5 and row["h2d_ms"]["max"] == 0.5 and row["d2h_ms"]["min"] == 0.25
    assert row["enqueue_ms"]["max"] == 0.3 and row["total_gpu_compute_s"] == 0.005
    assert row["wall_ms"]["max"] == pytest.approx(6.0)  # what a Python caller waited, apart from Latency


def test_bench_runner_records_each_batch():
    clock = FakeClock()
    runner = FakeRunner(clock)
    result = bench_runner(runner, [1, 4], warmup_s=0.01, duration_s=0.0495, min_iters=5, clock=clock)
    assert runner.calls[0] == (1, 3, 4, 4)  # random inputs at the run's img_size
    b1, b4 = result["batches"]
    assert b1["iterations"] == 50 and b4["iterations"] == 13
    assert b4["throughput_ips"] == pytest.approx(4 * 13 / b4["total_host_walltime_s"], rel=1e-3)
    assert b4["throughput_qps"] == pytest.approx(13 / b4["total_host_walltime_s"], rel=1e-3)
    assert b4["latency_ms"]["median"] == pytest.approx(4.0)
    assert b4["gpu_compute_ms"] is None and b4["wall_ms"] is None
    assert result["threads"] is None and result["is_t4"] is False and result["warmup_s"] == 0.01
    assert result["latency_definition"] == WALL_LATENCY


def test_bench_runner_refuses_batches_above_the_engine_profile():
    runner = FakeRunner(FakeClock(), gpu=True)
    runner.max_batch = 8
    with pytest.raises(ValueError, match="batch 32 is above fake's max batch 8"):
        bench_runner(runner, [1, 8, 32], warmup_s=0.0, duration_s=0.0, min_iters=1, clock=FakeClock())
    assert runner.calls == []  # refused before any query


def test_bench_runner_gpu_timings_exclude_warmup_and_real_inputs_are_tiled():
    clock = FakeClock()
    runner = FakeRunner(clock, gpu=True)
    images = torch.arange(3 * 3 * 4 * 4, dtype=torch.float32).reshape(3, 3, 4, 4)
    result = bench_runner(runner, [5], warmup_s=0.02, duration_s=0.0, min_iters=3, inputs=images, clock=clock)
    (row,) = result["batches"]
    assert torch.equal(runner.last, torch.cat([images, images[:2]]))  # 3 real images tiled to a batch of 5
    assert row["iterations"] == 3 and len(runner.calls) == 4 + 3  # four 5 ms warm-up calls fill 0.02 s
    assert row["gpu_compute_ms"]["min"] == 5.0 and row["gpu_compute_ms"]["max"] == 7.0  # calls 5-7: no warm-up
    assert row["latency_ms"]["min"] == 0.5 + 5.0 + 0.05 and row["wall_ms"]["max"] == pytest.approx(5.0)
    assert result["latency_definition"] == EVENT_LATENCY


def test_format_trtexec_follows_trtexecs_summary_on_gpu():
    clock = FakeClock()
    result = bench_runner(FakeRunner(clock, gpu=True), [2], warmup_s=0.0, duration_s=0.0, min_iters=3, clock=clock)
    lines = format_trtexec(result).splitlines()
    assert lines[0].startswith("=== Performance summary ===") and lines[1] == f"Latency = {EVENT_LATENCY}"
    order = ["Throughput: ", "Latency: min = ", "Enqueue Time: min = ", "H2D Latency: min = ",
             "GPU Compute Time: min = ", "D2H Latency: min = ", "Total Host Walltime: ", "Total GPU Compute Time: "]
    found = [next(i for i, line in enumerate(lines) if line.startswith(head)) for head in order]
    assert found == sorted(found)
    latency = lines[found[1]]
    for field in ("max = ", "mean = ", "median = ", "percentile(90%) = ", "percentile(95%) = ",
                  "percentile(99%) = "):
        assert field in latency, field
    assert " qps (" in lines[found[0]] and "images/s" in lines[found[0]]
    assert "CPU threads" not in "\n".join(lines) and "ESTIMATE" not in "\n".join(lines)


def test_format_trtexec_on_cpu_says_what_latency_is_and_the_threads():
    clock = FakeClock()
    runner = FakeRunner(clock)
    runner.threads = 2
    text = format_trtexec(bench_runner(runner, [1], warmup_s=0.0, duration_s=0.0, min_iters=3, clock=clock))
    assert f"Latency = {WALL_LATENCY}" in text and "CPU threads: 2" in text
    assert "Latency: min = 1 ms" in text and "Total Host Walltime: 0.003 s (3 queries" in text
    assert "H2D Latency" not in text and "GPU Compute" not in text and "Enqueue Time" not in text


def test_busy_cpu_seconds_reads_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    hz = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal guest guest_nice: idle and iowait are not busy
    stat.write_text(f"cpu  {3 * hz} {hz} {2 * hz} {50 * hz} {7 * hz} 0 {hz} 0 {4 * hz} 0\ncpu0 1 2 3\n")
    assert busy_cpu_seconds(str(stat)) == pytest.approx(7.0)  # guest time is already inside user
    assert busy_cpu_seconds(str(tmp_path / "absent")) is None


def test_contention_subtracts_our_own_cpu_time():
    alone = contention(busy=(100.0, 110.0), own=(5.0, 14.9), wall_s=5.0, cpus=2)  # we used 9.9 of 10 busy s
    assert alone["other_cores"] == pytest.approx(0.02) and not alone["contended"]
    shared = contention(busy=(100.0, 110.0), own=(5.0, 10.0), wall_s=5.0, cpus=2)  # someone else used 5 s
    assert shared["other_cores"] == pytest.approx(1.0) and shared["contended"]


def test_format_trtexec_warns_when_other_processes_took_the_cores():
    clock = FakeClock()
    result = bench_runner(FakeRunner(clock), [1], warmup_s=0.0, duration_s=0.0, min_iters=2, clock=clock)
    assert "WARNING" not in format_trtexec(result)
    result["cpu_contention"] = contention(busy=(0.0, 10.0), own=(0.0, 4.0), wall_s=5.0, cpus=2)
    assert "WARNING: other processes used 1.2 of 2 cores on average" in format_trtexec(result)


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
    for key in ("runtime", "precision", "device", "is_t4", "threads", "latency_definition", "batches", "warmup_s",
                "model", "date", "versions", "estimate", "input", "cpu_contention"):
        assert key in saved, key
    others = saved["cpu_contention"]  # this machine has /proc/stat
    assert others["other_cores"] >= 0 and others["cpus"] >= 1 and others["wall_s"] > 0
    assert saved["threads"] == 1 and saved["is_t4"] is False and saved["input"] == "random normal, seed 0"
    assert saved["latency_definition"] == WALL_LATENCY
    assert saved["model"]["params"] > 0 and saved["model"]["flops_per_image"] > 0
    assert saved["versions"]["onnxruntime"]
    for row, b in zip(saved["batches"], (1, 3)):
        assert set(row) == {"batch", "iterations", "total_host_walltime_s", "throughput_qps", "throughput_ips",
                            "latency_ms", "enqueue_ms", "h2d_ms", "gpu_compute_ms", "d2h_ms", "total_gpu_compute_s",
                            "wall_ms"}
        assert row["batch"] == b and row["iterations"] == 3 and row["gpu_compute_ms"] is None
        assert set(row["latency_ms"]) == {"min", "mean", "median", "p90", "p95", "p99", "max"}
        assert row["latency_ms"]["mean"] * 3 / 1e3 <= row["total_host_walltime_s"] + 1e-4
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
    assert out.count("=== Performance summary ===") == 1 and "CPU threads: 1 " in out  # the summary: stdout
    assert "wrote " in err and "wrote " not in out  # status: stderr
    assert "error: SKIP cnn-ft" in err and "python -m export --runs" in err
    assert main(["bench", "--runs", str(runs_onnx), "--runtime", "torch", "--pairs", "cnn-probe", "--batch", "1",
                 "--warmup", "0", "--duration", "0", "--iterations", "2", "--device", "cpu"]) == 0
    assert (runs_onnx / "cnn-probe" / "latency" / "torch.json").exists()


def test_bench_pair_closes_its_runner_even_when_the_benchmark_fails(run_onnx, monkeypatch):
    """A TensorRT runner holds device memory, streams and CUDA graphs until ``close``."""
    from bakeoff.engines import bench as B
    from bakeoff.engines import runners

    closed = []

    class Closing(runners.RUNTIMES["onnxruntime"]):
        def close(self):
            closed.append(True)

    monkeypatch.setitem(runners.RUNTIMES, "onnxruntime", Closing)
    monkeypatch.setattr(B, "bench_runner", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("refused enqueue")))
    with pytest.raises(RuntimeError, match="refused enqueue"):
        B.bench_pair(run_onnx, "onnxruntime", [1], write=False)
    assert closed == [True]
