"""bench/gpu_check: the subset, what runs where (and why the rest is skipped), the commands it chains, the summary,
and the shell wrapper. The commands themselves are the stage CLIs, tested in their own modules; a real run of the
CPU fallback is in the README."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from bakeoff.train.data.dataset import load_dataset
from bench import gpu_check as G

REPO = Path(__file__).resolve().parents[2]

CPU_ENV = {"python": "3.11", "torch": "2.x", "cpus": 2, "gpu": None, "no_gpu": "torch sees no CUDA GPU",
           "onnxruntime": "1.32.0: CPUExecutionProvider", "onnxruntime_providers": ["CPUExecutionProvider"],
           "no_onnxruntime": None, "tensorrt": None,
           "no_tensorrt": "tensorrt is not importable (ModuleNotFoundError: No module named 'tensorrt')",
           "cuda_binding": "cuda-python", "no_cuda_binding": None, "open_clip": "3.3.0", "no_open_clip": None}
GPU_ENV = CPU_ENV | {"gpu": "NVIDIA H200 (sm_90, 139 GiB)", "no_gpu": None,
                     "onnxruntime_providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                               "CPUExecutionProvider"]}


def skipped(env: dict) -> dict[str, str | None]:
    return {cfg.label: why for cfg, why in G.bench_configs(env)}


def test_without_a_gpu_the_cpu_runs_and_every_gpu_benchmark_says_why_not():
    why = skipped(CPU_ENV)
    assert why["torch fp32 CPU"] is None and why["ONNX Runtime CPU fp32"] is None
    for label in ("torch fp16 eager", "torch fp16 CUDA graph"):
        assert why[label] == "no GPU (torch sees no CUDA GPU)"
    assert "has no CUDAExecutionProvider (it has CPUExecutionProvider; install onnxruntime-gpu)" in \
        why["ONNX Runtime CUDA fp16"]
    assert "has no TensorrtExecutionProvider" in why["ONNX Runtime TensorRT fp16"]
    assert why["TensorRT fp16"] == why["TensorRT fp16 CUDA graph"] == CPU_ENV["no_tensorrt"]


def test_on_a_gpu_each_missing_piece_skips_only_what_needs_it():
    why = skipped(GPU_ENV)
    assert "torch fp32 CPU" not in why and "ONNX Runtime CPU fp32" not in why
    assert all(why[k] is None for k in ("torch fp16 eager", "torch fp16 CUDA graph", "ONNX Runtime CUDA fp16",
                                        "ONNX Runtime TensorRT fp16"))
    assert why["TensorRT fp16"] == CPU_ENV["no_tensorrt"]  # TensorRT not importable here
    with_trt = skipped(GPU_ENV | {"tensorrt": "10.13.3.9", "no_tensorrt": None, "cuda_binding": "pycuda"})
    assert with_trt["TensorRT fp16"] is None
    assert with_trt["TensorRT fp16 CUDA graph"] == "CUDA graphs need cuda-python, not pycuda"
    none = skipped(GPU_ENV | {"tensorrt": "10.13.3.9", "no_tensorrt": None, "cuda_binding": None,
                              "no_cuda_binding": "cuda.bindings.runtime is not importable (...); pycuda ..."})
    assert none["TensorRT fp16"].startswith("cuda.bindings.runtime is not importable")


def test_tensorrt_bindings_without_their_libraries_are_reported_as_absent(monkeypatch):
    real = G.importlib.import_module

    def no_libnvinfer(name):
        if name == "tensorrt":
            raise OSError("libnvinfer.so.10: cannot open shared object file: No such file or directory")
        return real(name)

    monkeypatch.setattr(G.importlib, "import_module", no_libnvinfer)
    env = G.environment("cpu")
    assert env["tensorrt"] is None and env["gpu"] is None and env["no_gpu"] == "--device cpu was asked for"
    assert env["no_tensorrt"] == "tensorrt is not importable (OSError: libnvinfer.so.10: cannot open shared object " \
                                 "file: No such file or directory)"


def test_the_subset_is_stratified_prepared_and_points_at_the_source_images(tiny_data, tmp_path):
    info = G.make_subset(tiny_data, tmp_path / "sub", 120)
    src, sub = load_dataset(tiny_data), load_dataset(tmp_path / "sub")
    assert info["images"] == len(sub) <= 120 and sum(info["splits"].values()) == len(sub)
    assert set(sub.ids) <= set(src.ids) and sub.splits is not None
    assert all(Path(p).is_absolute() and Path(p).exists() for p in sub.images)
    counts = sub.labels().sum(0)
    assert (counts >= G.MIN_TAG_IMAGES).all() and info["tags"] == len(sub.taxonomy)
    assert sub.taxonomy == [t for t in src.taxonomy if t in set(sub.taxonomy)]  # the source's column order
    # stratified: each kept tag's share in the subset is close to its share in the source
    src_share = src.labels()[:, [src.taxonomy.index(t) for t in sub.taxonomy]].mean(0)
    assert np.abs(counts / len(sub) - src_share).max() < 0.1


def test_the_check_chains_the_stage_clis_and_summarises_their_artifacts(tiny_data, tmp_path, monkeypatch, capsys):
    """main() over a stand-in for each stage process (it records the command, writes what the stage would):
    the commands, the skip reasons, the table."""
    calls: list[list[str]] = []
    runs = tmp_path / "out" / "runs"

    def run(self, name, argv, ok_codes=(0,)):
        calls.append(argv)
        if argv[0] == "bakeoff.train" and "--backbone" in argv:
            pair = f"{argv[argv.index('--backbone') + 1]}-{argv[argv.index('--strategy') + 1]}"
            (runs / pair).mkdir(parents=True, exist_ok=True)
            (runs / pair / "model.safetensors").write_bytes(b"")
            (runs / pair / "config.json").write_text(json.dumps({
                "status": "complete", "backbone": {"name": "m"}, "preprocess": {"img_size": 32},
                "weights": {"kind": "random" if pair.startswith("clip") else "file"}}))
        if argv[0] == "bakeoff.evaluate":
            name_ = "torch-fp16" if "fp16" in argv else "torch"
            for pair in os.listdir(runs):
                (runs / pair / "eval" / name_).mkdir(parents=True, exist_ok=True)
                (runs / pair / "eval" / name_ / "metrics.json").write_text(
                    json.dumps({"status": "scored", "macro_f1": 0.5 if name_ == "torch" else 0.49}))
        if argv[:2] == ["bakeoff.engines", "bench"]:
            runtime = argv[argv.index("--runtime") + 1]
            from bakeoff.engines.bench import latency_path

            for pair in argv[argv.index("--pairs") + 1].split(","):
                if pair == "clip-ft" and runtime == "onnxruntime":
                    continue  # as when one pair's benchmark fails: its cell says so, the others are read
                path = latency_path(runs / pair, runtime, argv[argv.index("--precision") + 1])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"batches": [
                    {"batch": b, "latency_ms": {"median": 1.5 * b, "p99": 2.0 * b}, "throughput_ips": 100.0 * b}
                    for b in (1, 8, 32)]}))
        return self.record(G.Step(name, "passed", 0.1))

    monkeypatch.setattr(G.Check, "run", run)
    monkeypatch.setattr(G, "environment", lambda device: dict(CPU_ENV))
    code = G.main(["--data", str(tiny_data), "--out", str(tmp_path / "out"), "--images", "120",
                   "--image-size", "cnn=32", "--image-size", "dinov2=28", "--image-size", "clip=32",
                   "--epochs", "1", "--trials", "1", "--weights-dir", str(tmp_path / "w")])
    assert code == 0
    trains = [c for c in calls if c[0] == "bakeoff.train" and "--backbone" in c]
    assert [(c[c.index("--backbone") + 1], c[c.index("--strategy") + 1]) for c in trains] == G.PAIRS
    for c in trains:
        assert c[c.index("--weights") + 1] == "auto" and c[c.index("--weights-dir") + 1] == str(tmp_path / "w")
        assert c[c.index("--cache-size") + 1] == "32" and c[c.index("--device") + 1] == "auto"
    assert trains[2][trains[2].index("--image-size") + 1] == "28"
    assert calls[0][:3] == ["bakeoff.train", "--all", "--plan-weights"]
    evaluations = [c for c in calls if c[0] == "bakeoff.evaluate"]
    assert [c[c.index("--runtime") + 1] for c in evaluations] == ["torch", "torch"]
    assert "--precision" not in evaluations[0] and evaluations[1][evaluations[1].index("--precision") + 1] == "fp16"
    assert all(c[c.index("--device") + 1] == "cpu" for c in evaluations)
    assert [c[:2] for c in calls if c[0] == "bakeoff.export"] == [["bakeoff.export", "--fp16"]]
    benches = [c for c in calls if c[:2] == ["bakeoff.engines", "bench"]]
    assert [c[c.index("--runtime") + 1] for c in benches] == ["torch", "onnxruntime"]  # on the CPU
    assert all(c[c.index("--pairs") + 1] == "cnn-ft,dinov2-ft,clip-ft" for c in benches)
    out = capsys.readouterr().out
    assert "SKIPPED bench TensorRT fp16 (0.0 s) [tensorrt is not importable" in out
    assert "SKIPPED TensorRT engines" in out
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| clip-probe | m @ 32 | random init | - | 0.500 | 0.490 | - / - / - |" in summary
    assert "| torch fp32 CPU | 1.5 / 2 ms, 3,200/s | 1.5 / 2 ms, 3,200/s | 1.5 / 2 ms, 3,200/s |" in summary
    assert "| TensorRT fp16 | skipped | skipped | skipped |" in summary
    assert "| ONNX Runtime CPU fp32 | 1.5 / 2 ms, 3,200/s | 1.5 / 2 ms, 3,200/s | no result |" in summary
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["latency"]["torch fp32 CPU"]["cnn-ft"]["32"] == \
        {"median_ms": 48.0, "p99_ms": 64.0, "images_per_s": 3200.0}
    assert (tmp_path / "out" / "latency" / "ONNX_Runtime_CPU_fp32" / "dinov2-ft.json").exists()


def test_without_open_clip_the_clip_pairs_are_skipped_with_the_reason(tiny_data, tmp_path, monkeypatch, capsys):
    calls: list[list[str]] = []
    monkeypatch.setattr(G.Check, "run", lambda self, name, argv, ok_codes=(0,): calls.append(argv)
                        or self.record(G.Step(name, "failed", 0.0, "exit 1")))
    monkeypatch.setattr(G, "environment", lambda device: CPU_ENV | {
        "open_clip": None, "no_open_clip": "open_clip is not importable (ModuleNotFoundError: No module named "
                                           "'open_clip')"})
    assert G.main(["--data", str(tiny_data), "--out", str(tmp_path / "out"), "--images", "120"]) == 1
    assert not any("clip" in c for c in calls if "--backbone" in c)
    out = capsys.readouterr().out
    assert "SKIPPED train clip-probe (0.0 s) [open_clip is not importable (ModuleNotFoundError" in out
    assert "FAILED  train cnn-probe" in out  # and with no trained run, it stops after training, with its summary


def test_a_step_past_the_budget_is_skipped(tmp_path):
    check = G.Check(tmp_path, budget_s=0.0)
    step = check.run("train cnn-probe", ["bakeoff.train", "--help"])
    assert step.status == "skipped" and step.detail == "time budget of 0 s spent"


def test_a_failing_step_is_reported_with_its_log(tmp_path):
    step = G.Check(tmp_path, budget_s=60).run("broken", ["no_such_module_here"])
    assert step.status == "failed" and step.detail.startswith("exit 1: ") and "No module named" in step.detail
    assert Path(step.log).read_text().startswith(f"$ {sys.executable} -m no_such_module_here")


def test_the_shell_wrapper(tmp_path):
    script = REPO / "bench" / "gpu_check.sh"
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    echo = tmp_path / "python"
    echo.write_text("#!/usr/bin/env bash\necho \"$HF_HUB_OFFLINE $*\"\n")
    echo.chmod(0o755)
    env = dict(os.environ, PYTHON=str(echo))
    got = subprocess.run(["bash", str(script), "data/x", "weights/", "--images", "300"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, check=False)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "1 -m bench.gpu_check --data data/x --weights-dir weights/ --images 300"
    no_weights = subprocess.run(["bash", str(script), "data/x", "--images", "300"], capture_output=True, text=True,
                                env=env, cwd=tmp_path, check=True)
    assert no_weights.stdout.strip() == "1 -m bench.gpu_check --data data/x --images 300"
