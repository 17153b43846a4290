"""backbone-bakeoff: pick a pretrained backbone and a transfer strategy for multi-label product tagging.

The stages are sub-packages, upstream to downstream: ``train`` (data, backbones, strategies), ``export``
(ONNX, TensorRT), ``engines`` (runners, benchmarks), ``evaluate`` (metrics, scores), ``reports``;
``common`` holds what every stage uses (atomic io, device, timing). Commands: ``bakeoff <stage> ...``, or
``python -m <stage> ...`` from the repository root (the design card's spelling).
"""
