"""OrtRunner against TorchRunner on a tiny run; providers, threads, missing and stale exports."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from bakeoff.common.device import cpu_threads
from bakeoff.engines import open_runner
from bakeoff.engines.ort_runner import (
    TRT_CACHE,
    OrtRunner,
    pick_providers,
    tensorrt_options,
    with_options,
)
from bakeoff.engines.runners import MissingExport, TorchRunner
from bakeoff.train.decision import Decision


@pytest.fixture(scope="module")
def batch(run_onnx):
    size = json.loads((run_onnx / "config.json").read_text())["preprocess"]["img_size"]
    return torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_fp32_matches_torch(run_onnx, batch):
    expected = TorchRunner(run_onnx, device="cpu").predict(batch)
    ort = open_runner(run_onnx, "onnxruntime", threads=1)
    got = ort.predict(batch)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(ort.predict(batch.numpy()), got)  # numpy in, same answer


def test_fp16_runs_close_to_torch(run_onnx, batch):
    expected = TorchRunner(run_onnx, device="cpu").predict(batch)
    ort = OrtRunner(run_onnx, precision="fp16", threads=1)
    got = ort.predict(batch)
    assert got.dtype == np.float32 and ort.precision == "fp16" and ort.path.name == "model.fp16.onnx"
    scale = np.abs(expected).max()
    assert 0 < np.abs(got - expected).max() < 1e-2 * scale  # fp16, not the fp32 file


def test_threads_are_pinned_and_reported(run_onnx):
    ort = OrtRunner(run_onnx, threads=1)
    assert ort.threads == 1 and ort.describe()["threads"] == 1
    assert "(1 onnxruntime threads)" in ort.device and ort.describe()["providers"] == ["CPUExecutionProvider"]
    assert ort.session.get_session_options().intra_op_num_threads == 1


def test_threads_come_from_the_argument_else_omp_num_threads_else_every_core(run_onnx, monkeypatch):
    n = os.cpu_count() + 1  # neither the default nor what the argument says
    monkeypatch.setenv("OMP_NUM_THREADS", str(n))
    assert cpu_threads(1) == 1 and cpu_threads() == n
    ort = OrtRunner(run_onnx)
    assert ort.threads == n and ort.session.get_session_options().intra_op_num_threads == n
    assert f"({n} onnxruntime threads)" in ort.device
    assert OrtRunner(run_onnx, threads=1).threads == 1  # --threads wins over the environment
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert TorchRunner(run_onnx, device="cpu").threads == n == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads() == os.cpu_count()


# -- onnxruntime-gpu's TensorRT provider, as its Python binding parses options ----------------------------------
# onnxruntime/python/onnxruntime_pybind_state.cc (microsoft/onnxruntime; read through the code index, the version
# with trt_timing_cache_enable): each TensorRT EP boolean option must be "True"/"true"/"False"/"false", anything
# else is ORT_THROW("[ERROR] [TensorRT] The value for the key '<key>' should be 'True' or 'False'. Default value
# is 'False'."); a path option must be non-empty; an unknown key is "Invalid TensorRT EP option: <key>". Before
# that, onnxruntime's Python layer (check_and_normalize_provider_args, the installed onnxruntime's own function,
# used below) turns every key and value into str(), so Python True becomes "True". A RuntimeError from session
# creation makes InferenceSession print "EP Error ..." and retry on ["CUDAExecutionProvider",
# "CPUExecutionProvider"] (onnxruntime_inference_collection.py): the TensorRT provider is then silently gone.
TRT_BOOL_OPTIONS = {"trt_fp16_enable", "trt_int8_enable", "trt_engine_cache_enable", "trt_timing_cache_enable",
                    "trt_force_timing_cache", "trt_dump_subgraphs", "trt_cuda_graph_enable", "trt_layer_norm_fp32_fallback",
                    "trt_force_sequential_engine_build", "trt_context_memory_sharing_enable", "trt_sparsity_enable",
                    "trt_build_heuristics_enable", "trt_detailed_build_log", "trt_dla_enable"}
TRT_PATH_OPTIONS = {"trt_engine_cache_path", "trt_timing_cache_path", "trt_engine_cache_prefix"}
GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def parse_tensorrt_options(options: dict[str, str]) -> None:
    """What onnxruntime's binding does with the TensorRT EP's (already str()-normalised) options."""
    for key, value in options.items():
        if key in TRT_BOOL_OPTIONS:
            if value not in ("True", "true", "False", "false"):
                raise RuntimeError(f"[ERROR] [TensorRT] The value for the key '{key}' should be 'True' or 'False'. "
                                   "Default value is 'False'.\n")
        elif key in TRT_PATH_OPTIONS:
            if not value:
                raise RuntimeError(f"[ERROR] [TensorRT] The value for the key '{key}' should be a path string.\n")
        else:
            raise RuntimeError(f"Invalid TensorRT EP option: {key}")


@pytest.fixture
def ort_gpu(monkeypatch):
    """onnxruntime-gpu as OrtRunner sees it: TensorRT, CUDA and CPU providers; session creation normalises and
    parses the provider options as the real package does and, on an EP error, falls back to CUDA + CPU as it does.
    The graph itself runs on the real CPU session underneath. Returns the list of EP errors printed."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_inference_collection import check_and_normalize_provider_args

    real_session, errors = onnxruntime.InferenceSession, []

    class GpuSession:
        def __init__(self, path, sess_options=None, providers=None, provider_options=None, **kwargs):
            names, options = check_and_normalize_provider_args(providers, provider_options, GPU_PROVIDERS)
            try:
                for name, opts in zip(names, options):
                    if name == "TensorrtExecutionProvider":
                        parse_tensorrt_options(opts)
                self._providers = names
            except RuntimeError as e:
                errors.append(f"EP Error {e} when using {providers}")
                self._providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            self._cpu = real_session(path, sess_options, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return self._providers

        def __getattr__(self, name):
            return getattr(self._cpu, name)

    monkeypatch.setattr("bakeoff.engines.ort_runner.ort.get_available_providers", lambda: list(GPU_PROVIDERS))
    monkeypatch.setattr("bakeoff.engines.ort_runner.ort.InferenceSession", GpuSession)
    monkeypatch.setattr("bakeoff.engines.ort_runner.device_name", lambda device: "Fake GPU" if device.type == "cuda" else "CPU")
    return errors


def test_tensorrt_provider_options(tmp_path):
    cache = tmp_path / "export" / TRT_CACHE
    fp16 = tensorrt_options("fp16", cache)
    assert fp16 == {"trt_fp16_enable": "True", "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache)}
    assert tensorrt_options("fp32", cache)["trt_fp16_enable"] == "False"
    for options in (fp16, tensorrt_options("fp32", cache)):
        parse_tensorrt_options(options)  # the real binding's rules accept them
    with pytest.raises(RuntimeError, match="The value for the key 'trt_fp16_enable' should be 'True' or 'False'"):
        parse_tensorrt_options(fp16 | {"trt_fp16_enable": "1"})
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert with_options(gpu, "fp16", cache) == [("TensorrtExecutionProvider", fp16), *gpu[1:]]
    assert with_options(gpu[1:], "fp16", cache) == gpu[1:]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_tensorrt_provider_accepts_the_runners_options(run_onnx, batch, ort_gpu, precision):
    """With "1"/"0" options onnxruntime-gpu would print an EP error, drop TensorRT and the runner would refuse."""
    runner = OrtRunner(run_onnx, device="tensorrt", precision=precision)
    assert ort_gpu == [] and runner.providers == GPU_PROVIDERS and runner.threads is None
    assert runner.device == "Fake GPU via TensorrtExecutionProvider"
    assert (run_onnx / "export" / TRT_CACHE).is_dir()
    assert runner.predict(batch).shape == (len(batch), 30)


def test_a_dropped_tensorrt_provider_is_an_error(run_onnx, ort_gpu, monkeypatch):
    monkeypatch.setattr("bakeoff.engines.ort_runner.tensorrt_options", lambda precision, cache: {"trt_fp16_enable": "1"})
    with pytest.raises(RuntimeError, match=r"onnxruntime dropped TensorrtExecutionProvider .*'EP Error' message"):
        OrtRunner(run_onnx, device="tensorrt")
    assert "should be 'True' or 'False'" in ort_gpu[0]


def test_providers():
    cpu_only = ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert pick_providers("cpu", gpu) == cpu_only
    assert pick_providers("auto", cpu_only) == cpu_only
    assert pick_providers("auto", gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert pick_providers("tensorrt", gpu) == gpu
    with pytest.raises(RuntimeError, match="no CUDAExecutionProvider .*available: \\['CPUExecutionProvider'\\]"):
        pick_providers("cuda", cpu_only)
    with pytest.raises(ValueError, match="choose from"):
        pick_providers("tpu", gpu)


def test_missing_onnx_says_how_to_export(runs_onnx):
    with pytest.raises(MissingExport, match=r"cnn-ft/export/model.onnx: no such file.*python -m export --runs"):
        OrtRunner(runs_onnx / "cnn-ft")
    with pytest.raises(MissingExport, match=r"model.fp16.onnx.*--fp16"):
        OrtRunner(runs_onnx / "cnn-ft", precision="fp16")


def test_stale_export_is_refused(run_onnx, tmp_path):
    stale = tmp_path / "cnn-probe"
    shutil.copytree(run_onnx, stale)
    cfg = json.loads((stale / "config.json").read_text())
    cfg["taxonomy"] = cfg["taxonomy"][:-1]
    (stale / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="30 outputs but the run has 29 tags; the export is stale"):
        OrtRunner(stale)


def test_torch_runner_options(run_onnx, batch):
    before = torch.get_num_threads()
    try:
        runner = TorchRunner(run_onnx, device="cpu", precision="bf16", threads=1)
        assert runner.threads == 1 == torch.get_num_threads() and runner.describe()["cuda_graph"] is False
    finally:
        torch.set_num_threads(before)
    assert runner.prepare(batch).is_contiguous(memory_format=torch.channels_last)
    assert runner.predict(batch).dtype == np.float32 and runner.last_timing is None
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        TorchRunner(run_onnx, device="cpu", cuda_graph=True)


def test_unloadable_onnx_names_the_file(run_onnx, tmp_path):
    broken = tmp_path / "cnn-probe"
    shutil.copytree(run_onnx, broken)
    (broken / "export" / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(RuntimeError, match=r"cnn-probe/export/model.onnx: onnxruntime .* cannot load it"):
        OrtRunner(broken)


def test_export_of_another_checkpoint_is_refused(run_onnx, tmp_path):
    import onnx

    from bakeoff.common.io import sha256_file

    stale = tmp_path / "cnn-probe"
    shutil.copytree(run_onnx, stale)
    path = stale / "export" / "model.onnx"
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"source_sha256": sha256_file(stale / "model.safetensors")})
    onnx.save(model, str(path))
    OrtRunner(stale)  # metadata matches the checkpoint
    onnx.helper.set_model_props(model, {"source_sha256": "0" * 64})
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="exported from another checkpoint .*the export is stale"):
        OrtRunner(stale)


def test_runners_carry_the_runs_decision_rule(run_onnx, batch):
    """Each runner holds thresholds.json as a Decision (arg-max within each group, thresholds elsewhere), and the
    rule applied to the ONNX logits gives the PyTorch model's tag decisions."""
    from bakeoff.train.run import read_run

    _, decision = read_run(run_onnx)
    torch_runner, ort = TorchRunner(run_onnx, device="cpu"), OrtRunner(run_onnx, threads=1)
    for runner in (torch_runner, ort):
        assert isinstance(runner.decision, Decision) and runner.decision.groups == decision.groups
        np.testing.assert_array_equal(runner.decision.thresholds, decision.thresholds)
    tags = [decision.apply(decision.scores(r.predict(batch))) for r in (torch_runner, ort)]
    np.testing.assert_array_equal(*tags)
    for g in decision.groups:  # one tag per group and image
        assert (tags[1][:, list(g)].sum(axis=1) == 1).all()
