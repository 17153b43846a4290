"""Export one run end to end: ONNX fp32 -> (FP16 ONNX) -> parity -> (TensorRT FP16 engine + its parity).

Writes ``RUNS/<pair>/export/``: ``model.onnx``, ``model.fp16.onnx``, ``parity.json``, and where TensorRT and a
GPU exist ``model.<gpu>.fp16.engine`` + ``model.<gpu>.fp16.engine.json``. A parity failure writes parity.json
with status "failed" and raises ``ParityFailed``; no engine is built from a model that failed parity, and an
engine keeps its own parity verdict in its sidecar, which refuses it unless that verdict is "passed". Parity
counts decision flips under the run's rule (thresholds.json as a :class:`train.decision.Decision`), which the
ONNX metadata also carries; an export is current for the checkpoint and the thresholds.json it was made with.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime

from bakeoff.common.io import read_json, sha256_file
from bakeoff.common.log import Say, Steps, progress_bar
from bakeoff.export import tensorrt as trt_export
from bakeoff.export.fp16 import convert_fp16
from bakeoff.export.onnx_export import (
    EXPORT_DIR,
    ONNX_FP16,
    ONNX_FP32,
    PARITY,
    check_onnx,
    export_onnx,
)
from bakeoff.export.parity import (
    DEFAULT_TOLERANCES,
    ParityFailed,
    Tolerance,
    ort_logits,
    parity_inputs,
    parity_report,
    torch_logits,
    write_parity,
)
from bakeoff.train.data.dataset import load_dataset
from bakeoff.train.run import CONFIG, MODEL, THRESHOLDS, is_complete, load_run

logger = logging.getLogger(__name__)


@dataclass
class ExportOptions:
    fp16: bool = False  # also the FP16 ONNX and (where TensorRT and a GPU exist) the FP16 engine
    data: str | None = None  # dataset for parity images (default: the run's own)
    n_images: int = 256
    batch_size: int = 32
    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    engine: trt_export.EngineOptions = field(default_factory=trt_export.EngineOptions)
    force: bool = False  # re-export even when the existing export is current
    progress: bool = False  # progress bars: across runs, over each run's steps, over TensorRT's build phases


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


def _log_engine_notes(pair: str, opts: ExportOptions, env: dict | None, say: Say) -> None:
    """With --fp16: why no engine is built here, or the --target warning for this GPU's engine."""
    if env is None:
        say.info(f"{pair}: no TensorRT engine built: {trt_export.trt_unavailable_reason()}")
        return
    warning = trt_export.target_warning(opts.engine.target, env)
    if warning:
        say.warning(f"{pair}: {warning}")


def planned_steps(opts: ExportOptions, onnx_current: bool, env: dict | None) -> list[str]:
    """The steps an export of one run goes through (its progress bar's), in order."""
    onnx = [] if onnx_current else ["ONNX export"] + (["FP16 conversion"] if opts.fp16 else [])
    engine = ["TensorRT engine build", "engine parity check"] if opts.fp16 and env is not None else []
    return ["load run", *onnx, "parity check", *engine]


def _wrote(say: Say, path: Path) -> None:
    say.debug(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def export_run(run_dir: str | Path, opts: ExportOptions, log: Callable[[str], None] | None = None) -> dict:
    """Export complete run ``run_dir``; returns parity.json's content. Raises ``ParityFailed`` on a failure.

    Skipped when current: the ONNX export matches the checkpoint and, with --fp16 where TensorRT and a GPU
    exist, this GPU's engine passes its sidecar check. A current ONNX export that passed parity is reused
    when only the engine is stale (another GPU or TensorRT version, a failed or missing parity check).

    Messages go to the ``bakeoff.export.pipeline`` logger, or as lines to ``log`` when given (``Say``). With
    ``opts.progress`` a bar follows the run's steps (``planned_steps``) and TensorRT's build phases.
    """
    run_dir = Path(run_dir)
    say = Say(logger, log)
    out = run_dir / EXPORT_DIR
    source_sha256 = sha256_file(run_dir / MODEL)  # once: a checkpoint can be hundreds of MB
    done = current_onnx(run_dir, opts, source_sha256)
    env = trt_export.current_trt_environment() if opts.fp16 else None
    say.debug(f"{run_dir.name}: TensorRT environment {env}" if opts.fp16 else f"{run_dir.name}: no --fp16, no engine")
    stale = stale_engine(run_dir, env) if done is not None and env is not None else None
    onnx_passed = done is not None and all(done["results"][k]["status"] == "passed" for k in wanted_graphs(opts))
    if done is not None and (stale is None or not onnx_passed):
        say.info(f"{run_dir.name}: export is current (same checkpoint), parity {done['status']}; skipped "
                 f"(--force redoes it)")
        if opts.fp16:
            _log_engine_notes(run_dir.name, opts, env, say)
        if done["status"] != "passed":
            raise ParityFailed(f"{out / PARITY}: parity {done['status']} (recorded earlier)")
        return done
    with Steps(run_dir.name, len(planned_steps(opts, done is not None, env)), opts.progress, say) as steps:
        return _export(run_dir, opts, say, steps, done, stale, env, source_sha256)


def _export(run_dir: Path, opts: ExportOptions, say: Say, steps: Steps, done: dict | None, stale: str | None,
            env: dict | None, source_sha256: str) -> dict:
    out = run_dir / EXPORT_DIR
    with steps.step("load run"):
        ds = load_dataset(opts.data or read_json(run_dir / CONFIG)["dataset"]["path"])
        model, config, decision = load_run(run_dir, ds)
    n_tags = len(config["taxonomy"])
    files = {"onnx_fp32": (out / ONNX_FP32, "fp32")} | ({"onnx_fp16": (out / ONNX_FP16, "fp16")} if opts.fp16 else {})
    if done is not None:
        say.info(f"{config['pair']}: ONNX export is current, reused; building the engine: {stale}")
        graphs = done["graphs"]
    else:
        with steps.step("ONNX export"):
            graphs = {"onnx_fp32": check_onnx(export_onnx(run_dir, ds=ds), n_tags)}
        _wrote(say, out / ONNX_FP32)
        if opts.fp16:
            with steps.step("FP16 conversion"):
                precision = convert_fp16(out / ONNX_FP32, out / ONNX_FP16)
                graphs["onnx_fp16"] = check_onnx(out / ONNX_FP16, n_tags) | {"precision": precision}
            _wrote(say, out / ONNX_FP16)

    with steps.step("parity check"):
        rows, inputs = parity_inputs(ds, config, opts.n_images)
        say.debug(f"{config['pair']}: parity on {len(rows)} test images of {ds.root}, batch {opts.batch_size}")
        reference = torch_logits(model, inputs, opts.batch_size)
        candidates = {name: {"logits": ort_logits(path, inputs, opts.batch_size), "precision": prec,
                             "file": path.name, "sha256": graphs[name]["sha256"],
                             "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"}
                      for name, (path, prec) in files.items()}
        info = {"pair": config["pair"], "source_sha256": source_sha256,
                "thresholds_sha256": sha256_file(run_dir / THRESHOLDS),
                "dataset": str(ds.root),
                "dataset_matches_run": ds.content_hash() == config["dataset"]["hash"],
                "images": f"{len(rows)} test rows spread evenly over the test split", "graphs": graphs}
        group_tags = [[config["taxonomy"][j] for j in g] for g in decision.groups]
        report = parity_report(reference, candidates, decision, opts.tolerances, group_tags=group_tags, **info)

    def finish(rep: dict) -> dict:
        say.info(f"{config['pair']}: parity {rep['status']} on {len(rows)} test images: "
                 + "; ".join(_fmt(k, v) for k, v in rep["results"].items()))
        write_parity(out / PARITY, rep)
        say.debug(f"wrote {out / PARITY}")
        return rep

    result = finish(report)
    if not opts.fp16:
        return result
    _log_engine_notes(config["pair"], opts, env, say)
    if env is None:
        return result
    engine = out / trt_export.engine_name(env)
    with steps.step("TensorRT engine build"):
        side = trt_export.build_engine(out / ONNX_FP32, out / ONNX_FP16, engine, config["preprocess"]["img_size"],
                                       opts.engine, trt_export.timing_cache_path(run_dir.parent, env), env,
                                       info["source_sha256"], progress=opts.progress)
    say.info(f"{config['pair']}: built {engine.name} (TensorRT {side['tensorrt']}, {side['build_path']}, "
             f"{side['build_seconds']} s)")
    _wrote(say, engine)
    with steps.step("engine parity check"):
        logits = trt_export.engine_logits(engine, inputs, min(opts.batch_size, opts.engine.max_batch))
        candidates["tensorrt_fp16"] = {"logits": logits, "precision": "fp16", "file": engine.name,
                                       "sha256": side["engine_sha256"],
                                       "runtime": f"TensorRT {side['tensorrt']} on {env['gpu']}",
                                       "sidecar": trt_export.sidecar_path(engine).name}
        rep = parity_report(reference, candidates, decision, opts.tolerances, group_tags=group_tags, **info)
        verdict = rep["results"]["tensorrt_fp16"]
        trt_export.write_engine_sidecar(engine, side | {"parity": {k: verdict[k] for k in PARITY_SUMMARY}})
    return finish(rep)


def export_runs(run_dirs: Sequence[Path], opts: ExportOptions, log: Callable[[str], None] | None = None) -> list[str]:
    """Export each run (``export_run``); returns the names of the runs that failed, each logged with its error.

    One broken run does not stop the others. With ``opts.progress`` a bar counts the runs, one step per run
    whatever its outcome, above the bar of the run being exported.
    """
    say = Say(logger, log)
    failed = []
    with progress_bar(opts.progress, total=len(run_dirs), desc="export", unit="run") as bar:
        for run_dir in run_dirs:
            bar.set_postfix_str(run_dir.name)
            try:
                export_run(run_dir, opts, log)
            except Exception as e:  # noqa: BLE001  one broken run must not stop the others; the exit code reports it
                say.error(f"FAILED {run_dir.name}: {type(e).__name__}: {e}")
                failed.append(run_dir.name)
            bar.update()
    return failed


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

