"""One prepared check of the GPU paths, end to end, on a small subset of a dataset: python -m bench.gpu_check.

    bench/gpu_check.sh DATASET [WEIGHTS_DIR] [options]          (the shell wrapper: offline, from any directory)
    python -m bench.gpu_check --data DATASET [--weights-dir DIR] [--images 2000] [--out runs/gpu-check] [--budget-s 480]

DATASET is a dataset directory (manifest.csv; python -m train.data import ...) or a Kaggle "Fashion Product
Images" folder (styles.csv + images/), which is imported first. Steps, each a stage CLI in its own process (as
reports.pipeline runs them), each timed:

1. environment: GPU, torch, onnxruntime providers, TensorRT, cuda-python / pycuda, open_clip, weights plan;
2. a stratified subset of DATASET (``--images``), prepared (splits 60/20/20);
3. the 3x2 grid trained at ``--image-size`` (224 px) with ``--weights auto`` (pretrained where WEIGHTS_DIR or the
   Hugging Face cache holds them, else random init, flagged);
4. python -m evaluate --runtime torch, fp32 and fp16;
5. python -m export --fp16 (ONNX, FP16 ONNX, and a TensorRT engine where TensorRT imports and a GPU exists);
6. python -m engines bench at batch 1/8/32 of each family's fine-tuned run (probe and fine-tune share one graph):
   torch fp16 eager and CUDA graph, ONNX Runtime CUDA and TensorRT providers, the TensorRT engine (eager, CUDA
   graph); without a GPU, torch and ONNX Runtime on the CPU instead;
7. one summary table, and where the artifacts are (OUT/summary.md, OUT/summary.json, OUT/logs/).

Whatever is missing (a GPU, TensorRT, an onnxruntime provider, open_clip, weights) is skipped with the reason
printed, never faked; a step that fails is reported with its log and the check goes on. Past ``--budget-s`` the
remaining steps are skipped (with that reason). The exit code is 0 when every step that ran passed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PAIRS = [(f, s) for f in ("cnn", "dinov2", "clip") for s in ("probe", "ft")]
MODELS = {"cnn": "efficientnet_lite0", "dinov2": "vit_small_patch14_dinov2", "clip": "ViT-B-32"}
MIN_TAG_IMAGES = 6  # tags rarer than this in the subset are dropped (a tag needs images in all three splits)


@dataclass
class Step:
    name: str
    status: str  # "passed" | "failed" | "skipped"
    seconds: float = 0.0
    detail: str = ""
    log: str | None = None


@dataclass
class Check:
    out: Path
    budget_s: float
    env: dict = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def record(self, step: Step) -> Step:
        self.steps.append(step)
        where = f" (log: {step.log})" if step.log and step.status != "passed" else ""
        say = f" [{step.detail}]" if step.detail else ""
        print(f"[{self.elapsed():6.0f} s] {step.status.upper():7s} {step.name} ({step.seconds:.1f} s){say}{where}",
              flush=True)
        return step

    def skip(self, name: str, reason: str) -> Step:
        return self.record(Step(name, "skipped", detail=reason))

    def run(self, name: str, argv: list[str], ok_codes: tuple[int, ...] = (0,)) -> Step:
        """``python -m ARGV`` in its own process, stdout+stderr to OUT/logs/<name>.log; skipped past the budget."""
        if self.elapsed() > self.budget_s:
            return self.skip(name, f"time budget of {self.budget_s:.0f} s spent")
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name.replace(' ', '_').replace('/', '-')}.log"
        t = time.perf_counter()
        with open(log, "w") as f:
            f.write(f"$ {sys.executable} -m {' '.join(argv)}\n")
            f.flush()
            code = subprocess.call([sys.executable, "-m", *argv], stdout=f, stderr=subprocess.STDOUT, cwd=self.out,
                                   env=child_env())
        seconds = time.perf_counter() - t
        tail = last_lines(log, 1)
        status = "passed" if code in ok_codes else "failed"
        return self.record(Step(name, status, seconds, "" if status == "passed" else f"exit {code}: {tail}", str(log)))


def child_env() -> dict[str, str]:
    """The stage CLIs find this checkout's packages; no network for model hubs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def last_lines(path: Path, n: int) -> str:
    lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(lines[-n:])[-300:]


# -- environment ---------------------------------------------------------------------------------------------

def try_import(name: str) -> tuple[object | None, str | None]:
    """(module, None), or (None, why): a real import, not a lookup (bindings without their libraries fail here)."""
    try:
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001  ImportError, or OSError from a library the module loads
        return None, f"{name} is not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def environment(device: str) -> dict:
    import torch

    env: dict = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    if device == "cpu":
        env["gpu"], env["no_gpu"] = None, "--device cpu was asked for"
    elif torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"], env["no_gpu"] = None, "torch sees no CUDA GPU"
    ort, why = try_import("onnxruntime")
    env["onnxruntime"] = f"{ort.__version__}: {', '.join(ort.get_available_providers())}" if ort else None
    env["onnxruntime_providers"] = ort.get_available_providers() if ort else []
    env["no_onnxruntime"] = why
    trt, why = try_import("tensorrt")
    env["tensorrt"], env["no_tensorrt"] = (trt.__version__ if trt else None), why
    cuda_rt, why_cuda = try_import("cuda.bindings.runtime")
    pycuda, why_pycuda = (None, "not tried") if cuda_rt else try_import("pycuda.driver")
    env["cuda_binding"] = "cuda-python" if cuda_rt else ("pycuda" if pycuda else None)
    env["no_cuda_binding"] = None if env["cuda_binding"] else f"{why_cuda}; {why_pycuda}"
    clip, why = try_import("open_clip")
    env["open_clip"], env["no_open_clip"] = (getattr(clip, "__version__", "yes") if clip else None), why
    return env


def print_environment(env: dict) -> None:
    print("== environment")
    print(f"python {env['python']}, torch {env['torch']}, {env['cpus']} CPUs")
    print(f"GPU: {env['gpu'] or 'none (' + env['no_gpu'] + ')'}")
    print(f"onnxruntime: {env['onnxruntime'] or env['no_onnxruntime']}")
    print(f"TensorRT: {env['tensorrt'] or env['no_tensorrt']}")
    print(f"CUDA bindings for the TensorRT runner: {env['cuda_binding'] or env['no_cuda_binding']}")
    print(f"open_clip: {env['open_clip'] or env['no_open_clip']}", flush=True)


# -- data ----------------------------------------------------------------------------------------------------

def make_subset(source: Path, dest: Path, n_images: int, seed: int = 0) -> dict:
    """A stratified ``n_images`` subset of the dataset at ``source`` written as a dataset at ``dest`` (absolute image
    paths, tags with fewer than MIN_TAG_IMAGES images in the subset dropped), prepared 60/20/20."""
    from bakeoff.train.data.dataset import load_dataset, write_dataset
    from bakeoff.train.data.splits import iterative_stratification, prepare

    ds = load_dataset(source)
    y = ds.labels()
    n = min(n_images, len(ds))
    rows = np.arange(len(ds)) if n == len(ds) else np.sort(
        iterative_stratification(y, {"keep": n, "rest": len(ds) - n}, seed)["keep"])
    counts = y[rows].sum(0)
    keep = {t for t, c in zip(ds.taxonomy, counts) if c >= MIN_TAG_IMAGES}
    ids, images, tags = [], [], []
    for i in rows:
        ts = [t for t in ds.tags[i] if t in keep]
        if ts:
            ids.append(ds.ids[i])
            images.append(str(ds.image_path(i).resolve()))
            tags.append(ts)
    write_dataset(dest, ids, images, tags, [t for t in ds.taxonomy if t in keep],
                  source={"subset_of": str(Path(source).resolve()), "images": len(ids), "seed": seed,
                          "method": "iterative stratification", "min_tag_images": MIN_TAG_IMAGES})
    stats = prepare(dest, test_size=0.2, val_fraction=0.25, seed=seed)
    return {"images": len(ids), "tags": len(keep), "dropped_tags": len(ds.taxonomy) - len(keep),
            "splits": load_dataset(dest).split_meta["sizes"], "long_tail_tags": len(stats.get("long_tail", []))}


# -- benchmarks ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchConfig:
    label: str
    argv: tuple[str, ...]  # python -m engines bench flags beyond --runs/--pairs/--batch
    runtime: str
    precision: str


def bench_configs(env: dict) -> list[tuple[BenchConfig, str | None]]:
    """Every benchmark configuration, with why it cannot run here (None when it can)."""
    gpu = env["gpu"] is not None
    providers = env["onnxruntime_providers"]
    no_gpu = None if gpu else f"no GPU ({env['no_gpu']})"
    no_ort = env["no_onnxruntime"]
    out: list[tuple[BenchConfig, str | None]] = []
    if gpu:
        out += [(BenchConfig("torch fp16 eager", ("--runtime", "torch", "--precision", "fp16", "--device", "cuda"),
                             "torch", "fp16"), None),
                (BenchConfig("torch fp16 CUDA graph", ("--runtime", "torch", "--precision", "fp16", "--device", "cuda",
                                                       "--cuda-graph"), "torch", "fp16"), None)]
    else:
        out += [(BenchConfig("torch fp32 CPU", ("--runtime", "torch", "--precision", "fp32", "--device", "cpu"),
                             "torch", "fp32"), None),
                (BenchConfig("torch fp16 eager", (), "torch", "fp16"), no_gpu),
                (BenchConfig("torch fp16 CUDA graph", (), "torch", "fp16"), no_gpu),
                (BenchConfig("ONNX Runtime CPU fp32", ("--runtime", "onnxruntime", "--precision", "fp32", "--device",
                                                       "cpu"), "onnxruntime", "fp32"), no_ort)]

    def provider(name: str) -> str | None:
        if no_ort:
            return no_ort
        if name not in providers:
            return f"this onnxruntime has no {name} (it has {', '.join(providers)}; install onnxruntime-gpu)"
        return no_gpu

    out += [(BenchConfig("ONNX Runtime CUDA fp16", ("--runtime", "onnxruntime", "--precision", "fp16", "--device",
                                                    "cuda"), "onnxruntime", "fp16"), provider("CUDAExecutionProvider")),
            (BenchConfig("ONNX Runtime TensorRT fp16", ("--runtime", "onnxruntime", "--precision", "fp16", "--device",
                                                        "tensorrt"), "onnxruntime", "fp16"),
             provider("TensorrtExecutionProvider"))]
    no_trt = env["no_tensorrt"] or no_gpu or (None if env["cuda_binding"] else env["no_cuda_binding"])
    no_graph = no_trt or (None if env["cuda_binding"] == "cuda-python" else "CUDA graphs need cuda-python, not pycuda")
    out += [(BenchConfig("TensorRT fp16", ("--runtime", "tensorrt"), "tensorrt", "fp16"), no_trt),
            (BenchConfig("TensorRT fp16 CUDA graph", ("--runtime", "tensorrt", "--cuda-graph"), "tensorrt", "fp16"),
             no_graph)]
    return out


def latency_row(result: dict) -> dict:
    """batch -> (median, p99 latency ms, images/s) of one engines bench result."""
    return {str(r["batch"]): {"median_ms": r["latency_ms"]["median"], "p99_ms": r["latency_ms"]["p99"],
                              "images_per_s": r["throughput_ips"]} for r in result["batches"]}


# -- summary -------------------------------------------------------------------------------------------------

def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pair_summary(runs: Path, pair: str) -> dict:
    from bakeoff.common.timing import training_seconds

    run = runs / pair
    config, timing = read(run / "config.json") or {}, read(run / "timing.json") or {}
    row: dict = {"pair": pair, "model": config.get("backbone", {}).get("name"),
                 "img_size": config.get("preprocess", {}).get("img_size"),
                 "weights": (config.get("weights") or {}).get("kind"), "status": config.get("status"),
                 "train_s": training_seconds(timing) if timing else None, "device": timing.get("device")}
    for name, key in (("torch", "torch_fp32"), ("torch-fp16", "torch_fp16")):
        m = read(run / "eval" / name / "metrics.json")
        row[key] = m.get("macro_f1") if m and m.get("status") == "scored" else None
    parity = read(run / "export" / "parity.json") or {}
    row["parity"] = {k: v.get("status") for k, v in parity.get("results", {}).items()}
    return row


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def summary_text(check: Check, pairs: list[dict], latency: dict, bench_pairs: list[str], batches: list[int]) -> str:
    env = check.env
    device = env["gpu"] or f"CPU only ({env['no_gpu']}; {os.environ.get('OMP_NUM_THREADS') or env['cpus']} threads)"
    ran_on = (f"Training, evaluation and benchmarks ran on: {device}. TensorRT: {env['tensorrt'] or 'absent'}. "
              f"onnxruntime: {env['onnxruntime'] or 'absent'}. Total {check.elapsed():.0f} s.")
    header = ("| pair | model @ px | weights | train s | torch fp32 macro-F1 | torch fp16 macro-F1 "
              "| parity onnx fp32 / fp16 / engine |")
    lines = ["# GPU check summary", "", ran_on, "", header, "|---|---|---|---|---|---|---|"]
    for r in pairs:
        parity = " / ".join(r["parity"].get(k) or "-" for k in ("onnx_fp32", "onnx_fp16", "tensorrt_fp16"))
        weights = {"random": "random init", None: "-"}.get(r["weights"], "pretrained")
        lines.append(f"| {r['pair']} | {r['model'] or '-'} @ {r['img_size'] or '-'} | {weights} "
                     f"| {fmt(r['train_s'], '.1f')} | {fmt(r['torch_fp32'])} | {fmt(r['torch_fp16'])} | {parity} |")
    title = (f"Latency of {', '.join(bench_pairs)} (median / p99 ms at batch {batches[0]}; images/s at batch "
             f"{batches[-1]}):")
    lines += ["", title, "", "| runtime | " + " | ".join(bench_pairs) + " |", "|---|" + "---|" * len(bench_pairs)]
    for label, per_pair in latency.items():
        cells = []
        for pair in bench_pairs:
            r = per_pair.get(pair)
            if isinstance(r, str):
                cells.append(r)
            elif r:
                lo, hi = r.get(str(batches[0])), r.get(str(batches[-1]))
                cells.append(f"{fmt(lo and lo['median_ms'], '.3g')} / {fmt(lo and lo['p99_ms'], '.3g')} ms, "
                             f"{fmt(hi and hi['images_per_s'], ',.0f')}/s")
            else:
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| step | status | s | detail |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail} |" for s in check.steps]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------------------

def sizes_by_family(values: list[str] | None, default: int) -> dict[str, int]:
    out = {f: default for f in MODELS}
    for v in values or []:
        fam, sep, px = v.partition("=")
        if sep:
            out[fam] = int(px)
        else:
            out = {f: int(v) for f in MODELS}
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="dataset directory, or a styles.csv + images/ folder")
    p.add_argument("--weights-dir", type=Path, help="local <arch>.<tag>.safetensors weights (else the HF cache)")
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"),
                   help="work and artifact directory (emptied first unless --keep)")
    p.add_argument("--images", type=int, default=2000, help="images in the stratified subset")
    p.add_argument("--image-size", action="append", help="input px, or FAMILY=PX (default 224 for every family)")
    p.add_argument("--model", action="append", help="FAMILY=NAME (default: " +
                   ", ".join(f"{f}={m}" for f, m in MODELS.items()) + ")")
    p.add_argument("--epochs", type=int, default=3, help="fine-tune epochs")
    p.add_argument("--probe-epochs", type=int, default=20)
    p.add_argument("--trials", type=int, default=2, help="hyper-parameter trials per pair")
    p.add_argument("--batch", default="1,8,32", help="benchmark batch sizes")
    p.add_argument("--warmup", type=float, default=0.3, help="benchmark warm-up per batch size, s")
    p.add_argument("--duration", type=float, default=1.0, help="benchmark duration per batch size, s")
    p.add_argument("--bench-pairs", default="cnn-ft,dinov2-ft,clip-ft",
                   help="runs to benchmark (a probe and its fine-tune share one graph)")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu: the CPU fallback even on a GPU")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip the remaining steps past this many seconds")
    p.add_argument("--keep", action="store_true", help="reuse OUT's subset and runs (default: start afresh)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    out = a.out.resolve()
    if out.exists() and not a.keep:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, a.budget_s)
    env = check.env = environment(a.device)
    print_environment(env)
    gpu = env["gpu"] is not None
    models = MODELS | dict(m.split("=", 1) for m in a.model or [])
    sizes = sizes_by_family(a.image_size, 224)
    batches = [int(b) for b in a.batch.split(",") if b]
    data, runs = out / "data", out / "runs"

    # data
    source = a.data.resolve()
    if not (source / "manifest.csv").exists() and (source / "styles.csv").exists():
        step = check.run("import", ["bakeoff.train.data", "import", "fashion-styles", str(source), "--out",
                                    str(out / "imported")])
        source = out / "imported"
        if step.status != "passed":
            return finish(check, a, runs, batches, {})
    if not (data / "splits.json").exists():
        t = time.perf_counter()
        try:
            info = make_subset(source, data, a.images)
        except Exception as e:  # noqa: BLE001  report it, and stop: nothing else can run without data
            check.record(Step("subset", "failed", time.perf_counter() - t, f"{type(e).__name__}: {e}"))
            return finish(check, a, runs, batches, {})
        check.record(Step("subset", "passed", time.perf_counter() - t,
                          f"{info['images']} images, {info['tags']} tags ({info['dropped_tags']} rarer than "
                          f"{MIN_TAG_IMAGES} dropped), splits {info['splits']}"))

    # train
    weights = ["--weights", "auto"] + (["--weights-dir", str(a.weights_dir.resolve())] if a.weights_dir else [])
    device = ["--device", "cpu" if a.device == "cpu" else "auto"]
    families = [f for f in MODELS if f != "clip" or env["open_clip"]]
    if "clip" not in families:
        for s in ("probe", "ft"):
            check.skip(f"train clip-{s}", env["no_open_clip"])
    schedule = ["--epochs", str(a.epochs), "--probe-epochs", str(a.probe_epochs)]
    plan = check.run("weights plan", ["bakeoff.train", "--all", "--plan-weights", "--profile", "full", *weights, *schedule,
                                      *[x for f in MODELS for x in ("--model", f"{f}={models[f]}")],
                                      *[x for f in MODELS for x in ("--image-size", f"{f}={sizes[f]}")]])
    if plan.log:
        print("   " + "\n   ".join(line for line in Path(plan.log).read_text().splitlines()[1:] if line.strip()))
    cache = max(sizes[f] for f in families)
    for fam in families:
        for strat in ("probe", "ft"):
            check.run(f"train {fam}-{strat}", [
                "bakeoff.train", "--backbone", fam, "--strategy", strat, "--data", str(data), "--out", str(runs),
                "--profile", "full", "--model", models[fam], "--image-size", str(sizes[fam]),
                "--cache-size", str(cache),
                *schedule, "--trials", str(a.trials), *weights, *device, "--no-progress"])
    if not any((runs / f"{f}-{s}" / "model.safetensors").exists() for f in families for s in ("probe", "ft")):
        return finish(check, a, runs, batches, {})

    # evaluate, export
    eval_device = ["--device", "cpu" if not gpu else "cuda"]
    check.run("evaluate torch fp32", ["bakeoff.evaluate", "--runs", str(runs), "--data", str(data), "--runtime", "torch",
                                      *eval_device, "--no-progress"])
    check.run("evaluate torch fp16", ["bakeoff.evaluate", "--runs", str(runs), "--data", str(data), "--runtime", "torch",
                                      "--precision", "fp16", *eval_device, "--no-progress"])
    if env["no_onnxruntime"]:
        check.skip("export", env["no_onnxruntime"])
    else:
        n_test = len((read(data / "splits.json") or {}).get("test", []))
        step = check.run("export --fp16", ["bakeoff.export", "--fp16", "--runs", str(runs), "--data", str(data),
                                           "--parity-images", str(min(256, n_test) or 256),
                                           "--max-batch", str(max(batches))])
        if step.status == "failed":  # one pair failing parity (random-init DINOv2 does) fails the command
            step.detail += " (per-pair parity in the table below; export continues past a failed pair)"
        if not env["tensorrt"]:
            check.skip("TensorRT engines", env["no_tensorrt"])
        elif not gpu:
            check.skip("TensorRT engines", f"no GPU ({env['no_gpu']})")

    # benchmarks
    bench_pairs = [p for p in a.bench_pairs.split(",") if p and (runs / p / "model.safetensors").exists()]
    latency: dict[str, dict] = {}
    for cfg, why in bench_configs(env):
        if why:
            check.skip(f"bench {cfg.label}", why)
            latency[cfg.label] = {p: "skipped" for p in bench_pairs}
            continue
        from bakeoff.engines.bench import latency_path

        files = {pair: latency_path(runs / pair, cfg.runtime, cfg.precision) for pair in bench_pairs}
        for path in files.values():  # another configuration's (same runtime and precision) was copied already
            path.unlink(missing_ok=True)
        step = check.run(f"bench {cfg.label}", [  # one process for the pairs: one interpreter start-up
            "bakeoff.engines", "bench", "--runs", str(runs), "--pairs", ",".join(bench_pairs), *cfg.argv, "--batch", a.batch,
            "--warmup", str(a.warmup), "--duration", str(a.duration), "--iterations", "10", "--data", str(data)])
        latency[cfg.label] = {}
        for pair, path in files.items():
            result = read(path)
            if result:  # the next configuration of this runtime and precision writes the same file: keep a copy
                dst = out / "latency" / cfg.label.replace(" ", "_") / f"{pair}.json"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dst)
                latency[cfg.label][pair] = latency_row(result)
            else:
                latency[cfg.label][pair] = {"passed": "no result"}.get(step.status, step.status)
    return finish(check, a, runs, batches, latency)


def finish(check: Check, a: argparse.Namespace, runs: Path, batches: list[int], latency: dict) -> int:
    bench_pairs = [p for p in a.bench_pairs.split(",") if p]
    pairs = [pair_summary(runs, f"{f}-{s}") for f, s in PAIRS if (runs / f"{f}-{s}").is_dir()]
    text = summary_text(check, pairs, latency, bench_pairs, batches)
    (check.out / "summary.md").write_text(text + "\n")
    (check.out / "summary.json").write_text(json.dumps(
        {"environment": check.env, "pairs": pairs, "latency": latency, "batches": batches,
         "steps": [vars(s) for s in check.steps], "seconds": round(check.elapsed(), 1)}, indent=1, default=str))
    print("\n" + text)
    print(f"\nartifacts: {check.out}/ (summary.md, summary.json; logs/ one log per step; data/ the subset; "
          "runs/<pair>/ checkpoints, export/ (ONNX, FP16 ONNX, engines, parity.json), eval/, latency/; "
          "latency/<runtime>/ every benchmark's JSON)")
    failed = [s.name for s in check.steps if s.status == "failed"]
    print(f"{len(failed)} step(s) failed: {', '.join(failed)}" if failed else "every step that ran passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
