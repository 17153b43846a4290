"""Export one run end to end: ONNX fp32 -> (FP16 ONNX) -> parity -> (TensorRT FP16 engine + its parity).

Writes ``RUNS/<pair>/export/``: ``model.onnx``, ``model.fp16.onnx``, ``parity.json``, and where TensorRT and a
GPU exist ``model.<gpu>.fp16.engine`` + ``model.<gpu>.fp16.engine.json``. A parity failure writes parity.json
with status "failed" and raises ``ParityFailed``; no engine is built from a model that failed parity, and an
engine keeps its own parity verdict in its sidecar, which refuses it unless that verdict is "passed". Parity
counts decision flips under the run's rule (thresholds.json as a :class:`train.decision.Decision`), which the
ONNX metadata also carries; an export is current for the checkpoint and the thresholds.json it was made with.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime

from export import tensorrt as trt_export
from export.fp16 import convert_fp16
from export.onnx_export import (
    EXPORT_DIR,
    ONNX_FP16,
    ONNX_FP32,
    PARITY,
    check_onnx,
    export_onnx,
)
from export.parity import (
    DEFAULT_TOLERANCES,
    ParityFailed,
    Tolerance,
    ort_logits,
    parity_inputs,
    parity_report,
    torch_logits,
    write_parity,
)
from train.data.dataset import load_dataset
from train.data.io import read_json, sha256_file
from train.run import CONFIG, MODEL, THRESHOLDS, is_complete, load_run


@dataclass
class ExportOptions:
    fp16: bool = False  # also the FP16 ONNX and (where TensorRT and a GPU exist) the FP16 engine
    data: str | None = None  # dataset for parity images (default: the run's own)
    n_images: int = 256
    batch_size: int = 32
    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    engine: trt_export.EngineOptions = field(default_factory=trt_export.EngineOptions)
    force: bool = False  # re-export even when the existing export is current


def wanted_graphs(opts: ExportOptions) -> set[str]:
    return {"onnx_fp32"} | ({"onnx_fp16"} if opts.fp16 else set())


def current_onnx(run_dir: Path, opts: ExportOptions, source_sha256: str) -> dict | None:
    """The existing parity report when the ONNX export is current: same checkpoint (``source_sha256``, the run's
    model.safetensors), same thresholds.json (its rule is in the metadata and judged the flips; a report from
    before this was recorded is current only for a rule without groups, the rule it judged by), same files,
    nothing missing."""
    out = run_dir / EXPORT_DIR
    if opts.force or not (out / PARITY).exists():
        return None
    rep = read_json(out / PARITY)
    wanted = wanted_graphs(opts)
    if rep.get("source_sha256") != source_sha256 or not wanted <= set(rep.get("results", {})):
        return None
    recorded = rep.get("thresholds_sha256")
    if recorded is None and read_json(run_dir / THRESHOLDS).get("groups"):
        return None
    if recorded is not None and recorded != sha256_file(run_dir / THRESHOLDS):
        return None
    if not all((out / rep["results"][k]["file"]).exists() for k in wanted):
        return None
    return rep


def stale_engine(run_dir: Path, env: dict) -> str | None:
    """Why this GPU's engine must be (re)built (absent, or refused by its sidecar check); None when it is current."""
    engine = run_dir / EXPORT_DIR / trt_export.engine_name(env)
    if not engine.exists():
        return f"no {engine.name} yet"
    try:
        trt_export.check_engine_sidecar(engine, run_dir, env)
    except trt_export.EngineMismatch as e:
        return str(e)
    return None


PARITY_SUMMARY = ("status", "flip_rate", "max_abs_prob", "failures")


def _fmt(name: str, r: dict) -> str:
    return (f"{name} max|dp| {r['max_abs_prob']:.1e}, flips {r['flips']}/{r['decisions']} "
            f"({r['flip_rate']:.2%}) {r['status']}")


def _log_engine_notes(pair: str, opts: ExportOptions, env: dict | None, log: Callable[[str], None]) -> None:
    """With --fp16: why no engine is built here, or the --target warning for this GPU's engine."""
    if env is None:
        log(f"{pair}: no TensorRT engine built: {trt_export.trt_unavailable_reason()}")
        return
    warning = trt_export.target_warning(opts.engine.target, env)
    if warning:
        log(f"WARNING {pair}: {warning}")


def export_run(run_dir: str | Path, opts: ExportOptions, log: Callable[[str], None] = print) -> dict:
    """Export complete run ``run_dir``; returns parity.json's content. Raises ``ParityFailed`` on a failure.

    Skipped when current: the ONNX export matches the checkpoint and, with --fp16 where TensorRT and a GPU
    exist, this GPU's engine passes its sidecar check. A current ONNX export that passed parity is reused
    when only the engine is stale (another GPU or TensorRT version, a failed or missing parity check).
    """
    run_dir = Path(run_dir)
    out = run_dir / EXPORT_DIR
    source_sha256 = sha256_file(run_dir / MODEL)  # once: a checkpoint can be hundreds of MB
    done = current_onnx(run_dir, opts, source_sha256)
    env = trt_export.current_trt_environment() if opts.fp16 else None
    stale = stale_engine(run_dir, env) if done is not None and env is not None else None
    onnx_passed = done is not None and all(done["results"][k]["status"] == "passed" for k in wanted_graphs(opts))
    if done is not None and (stale is None or not onnx_passed):
        log(f"{run_dir.name}: export is current (same checkpoint), parity {done['status']}; skipped (--force redoes it)")
        if opts.fp16:
            _log_engine_notes(run_dir.name, opts, env, log)
        if done["status"] != "passed":
            raise ParityFailed(f"{out / PARITY}: parity {done['status']} (recorded earlier)")
        return done
    ds = load_dataset(opts.data or read_json(run_dir / CONFIG)["dataset"]["path"])
    model, config, decision = load_run(run_dir, ds)
    n_tags = len(config["taxonomy"])
    files = {"onnx_fp32": (out / ONNX_FP32, "fp32")} | ({"onnx_fp16": (out / ONNX_FP16, "fp16")} if opts.fp16 else {})
    if done is not None:
        log(f"{config['pair']}: ONNX export is current, reused; building the engine: {stale}")
        graphs = done["graphs"]
    else:
        graphs = {"onnx_fp32": check_onnx(export_onnx(run_dir, ds=ds), n_tags)}
        if opts.fp16:
            precision = convert_fp16(out / ONNX_FP32, out / ONNX_FP16)
            graphs["onnx_fp16"] = check_onnx(out / ONNX_FP16, n_tags) | {"precision": precision}

    rows, inputs = parity_inputs(ds, config, opts.n_images)
    reference = torch_logits(model, inputs, opts.batch_size)
    candidates = {name: {"logits": ort_logits(path, inputs, opts.batch_size), "precision": prec, "file": path.name,
                         "sha256": graphs[name]["sha256"],
                         "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"}
                  for name, (path, prec) in files.items()}
    info = {"pair": config["pair"], "source_sha256": source_sha256,
            "thresholds_sha256": sha256_file(run_dir / THRESHOLDS),
            "dataset": str(ds.root),
            "dataset_matches_run": ds.content_hash() == config["dataset"]["hash"],
            "images": f"{len(rows)} test rows spread evenly over the test split", "graphs": graphs}

    def finish(rep: dict) -> dict:
        log(f"{config['pair']}: parity {rep['status']} on {len(rows)} test images: "
            + "; ".join(_fmt(k, v) for k, v in rep["results"].items()))
        write_parity(out / PARITY, rep)
        return rep

    group_tags = [[config["taxonomy"][j] for j in g] for g in decision.groups]
    result = finish(parity_report(reference, candidates, decision, opts.tolerances, group_tags=group_tags, **info))
    if not opts.fp16:
        return result
    _log_engine_notes(config["pair"], opts, env, log)
    if env is None:
        return result
    engine = out / trt_export.engine_name(env)
    side = trt_export.build_engine(out / ONNX_FP32, out / ONNX_FP16, engine, config["preprocess"]["img_size"],
                                   opts.engine, trt_export.timing_cache_path(run_dir.parent, env), env,
                                   info["source_sha256"])
    log(f"{config['pair']}: built {engine.name} (TensorRT {side['tensorrt']}, {side['build_path']}, "
        f"{side['build_seconds']} s)")
    logits = trt_export.engine_logits(engine, inputs, min(opts.batch_size, opts.engine.max_batch))
    candidates["tensorrt_fp16"] = {"logits": logits, "precision": "fp16", "file": engine.name,
                                   "sha256": side["engine_sha256"], "runtime": f"TensorRT {side['tensorrt']} on {env['gpu']}",
                                   "sidecar": trt_export.sidecar_path(engine).name}
    rep = parity_report(reference, candidates, decision, opts.tolerances, group_tags=group_tags, **info)
    verdict = rep["results"]["tensorrt_fp16"]
    trt_export.write_engine_sidecar(engine, side | {"parity": {k: verdict[k] for k in PARITY_SUMMARY}})
    return finish(rep)


def find_runs(runs: str | Path, pairs: list[str] | None = None) -> tuple[list[Path], list[str]]:
    """(complete run dirs to export, one line per run skipped and why); asked-for pairs must exist."""
    runs = Path(runs)
    if not runs.is_dir():
        raise FileNotFoundError(f"{runs}: no such runs directory")
    dirs = sorted(p for p in runs.iterdir() if p.is_dir() and (p / CONFIG).exists())
    if pairs:
        unknown = sorted(set(pairs) - {p.name for p in dirs})
        if unknown:
            raise FileNotFoundError(f"{runs}: no run named {unknown}; runs here: {[p.name for p in dirs]}")
        dirs = [p for p in dirs if p.name in pairs]
    skipped = [f"{p.name}: skipped, not complete (train it first)" for p in dirs if not is_complete(p)]
    return [p for p in dirs if is_complete(p)], skipped

