"""One runner interface over every runtime: ``predict(batch) -> logits``.

A batch is what the registry's preprocessing produces (float32, N x 3 x S x S, normalised; numpy or torch);
logits come back as float32 numpy N x T. A runner over a run carries the run's ``config`` and its ``decision``
(thresholds.json as a :class:`train.decision.Decision`): tags are ``decision.apply(decision.scores(logits))``,
arg-max within each softmax group and ``score >= threshold`` elsewhere; runners themselves return logits only.
Runtimes: ``torch`` (here), ``onnxruntime`` and ``tensorrt`` (engines.ort_runner / engines.trt_runner,
registered in RUNTIMES).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from bakeoff.common.device import cpu_threads, device_name, pick_device
from bakeoff.train.decision import Decision
from bakeoff.train.run import load_run

EXPORT = "export"  # RUNS/<pair>/export/: model.onnx, model.fp16.onnx, model.<gpu>.fp16.engine(.json)


class MissingExport(FileNotFoundError):
    """A run without the exported file a runtime needs; the message says how to make it."""


def export_hint(run_dir: Path, fp16: bool = False) -> str:
    return f"run python -m export --runs {run_dir.parent}" + (" --fp16" if fp16 else "")


class Runner:
    """Base class: ``name`` (runtime), ``device`` (in words), ``precision``; ``predict`` returns logits.

    GPU runners set ``last_timing`` after each ``predict``, in ms: ``h2d_ms``, ``gpu_compute_ms`` and ``d2h_ms``
    from CUDA events, and ``enqueue_ms`` (host time to enqueue the compute); benchmarks report them as trtexec
    does, with Latency = H2D + GPU compute + D2H.
    """

    name: str = ""
    device: str = ""
    precision: str = ""
    threads: int | None = None  # intra-op CPU threads actually used (None on GPU)
    max_batch: int | None = None  # the largest batch one query may hold (an engine's profile); None: no limit
    last_timing: dict | None = None
    config: dict | None = None  # the run's config.json (runners over a run)
    decision: Decision | None = None  # the run's rule: tags = decision.apply(decision.scores(logits))

    def prepare(self, batch: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """The batch in this runner's native input form (layout, dtype, pinned memory); ``predict`` accepts
        either form, so callers that feed one batch many times (benchmarks) convert it once, outside the timing."""
        return batch

    def predict(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the runtime holds (device buffers, streams, graphs); the runner is not used after it."""

    def describe(self) -> dict:
        return {"runtime": self.name, "device": self.device, "precision": self.precision, "threads": self.threads}


TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchRunner(Runner):
    """Eager PyTorch from a run directory; fp32, or fp16/bf16 autocast (bf16 is the CPU choice).

    On CPU it pins torch's intra-op threads (process-wide) to ``threads``, else ``$OMP_NUM_THREADS``, else every
    core; ``cuda_graph`` replays one captured CUDA graph per input shape (GPU only: removes the per-kernel launch
    cost that dominates small batches).
    """

    name = "torch"

    def __init__(self, run_dir: str | Path, device: str = "auto", precision: str = "fp32",
                 threads: int | None = None, cuda_graph: bool = False):
        if precision not in TORCH_DTYPES:
            raise ValueError(f"torch precision {precision!r}: choose from {list(TORCH_DTYPES)}")
        self.torch_device = pick_device(device)
        self.cuda = self.torch_device.type == "cuda"
        if cuda_graph and not self.cuda:
            raise ValueError(f"cuda_graph needs a CUDA device, not {self.torch_device}")
        if not self.cuda:
            torch.set_num_threads(cpu_threads(threads))
        self.threads = None if self.cuda else torch.get_num_threads()
        self.model, self.config, self.decision = load_run(run_dir, device=self.torch_device)
        self.precision = precision
        self.cuda_graph = cuda_graph
        self.device = device_name(self.torch_device)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def describe(self) -> dict:
        return super().describe() | {"cuda_graph": self.cuda_graph}

    def prepare(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(batch)
        if x.ndim == 4:  # the layout the registry's preprocessing produces (fast CPU convolutions)
            x = x.contiguous(memory_format=torch.channels_last)
        if self.cuda and not x.is_cuda and not x.is_pinned():
            x = x.pin_memory()
        return x

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = TORCH_DTYPES[self.precision]
        # no autocast weight cache: a captured graph must not hold casts made outside it
        with torch.autocast(self.torch_device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
            return self.model(x).float()

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        """Run ``x`` through the CUDA graph captured for its shape (captured on first sight)."""
        key = tuple(x.shape)
        if key not in self._graphs:
            static_in = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (cuDNN autotuning, allocator)
                for _ in range(2):
                    self._forward(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._forward(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out

    @torch.no_grad()
    def predict(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        x = self.prepare(batch)
        if not self.cuda:
            return self._forward(x.to(self.torch_device)).numpy()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        marks[0].record()
        x = x.to(self.torch_device, non_blocking=True)
        marks[1].record()
        t0 = time.perf_counter()
        y = self._replay(x) if self.cuda_graph else self._forward(x)
        enqueue_ms = (time.perf_counter() - t0) * 1e3
        marks[2].record()
        out = y.cpu()
        marks[3].record()
        marks[3].synchronize()
        h2d, compute, d2h = (a.elapsed_time(b) for a, b in pairwise(marks))
        self.last_timing = {"h2d_ms": h2d, "gpu_compute_ms": compute, "d2h_ms": d2h, "enqueue_ms": enqueue_ms}
        return out.numpy()


RUNTIMES: dict[str, Callable[..., Runner]] = {"torch": TorchRunner}


def open_runner(run_dir: str | Path, runtime: str = "torch", **kwargs) -> Runner:
    """The runner for ``runtime`` over run ``run_dir``."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; available here: {sorted(RUNTIMES)}")
    return RUNTIMES[runtime](run_dir, **kwargs)
