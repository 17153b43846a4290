"""Runners (torch, onnxruntime, tensorrt) behind one ``predict`` interface, and trtexec-style benchmarks.

Importing the package registers every runtime in ``engines.runners.RUNTIMES`` (tensorrt imports its libraries
only when a runner is opened, so this works on machines without them).
"""
from bakeoff.engines import ort_runner, trt_runner  # noqa: F401  (register the onnxruntime and tensorrt runtimes)
from bakeoff.engines.runners import RUNTIMES, Runner, TorchRunner, open_runner

__all__ = ["RUNTIMES", "Runner", "TorchRunner", "open_runner"]
