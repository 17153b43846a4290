"""Compare evaluated runs: one table of pairs, and a paired-bootstrap verdict on the top two.

Reads only eval artifacts (metrics.json, predictions.npy, the run's thresholds.json) and, for the verdict, the
test labels of the dataset the runs were scored on. Decisions are made by each run's own rule (thresholds.json as
a :class:`train.decision.Decision`: arg-max within each group, ``score >= threshold`` elsewhere). Two modes:

- one evaluation (``torch``, or a runtime + precision): pair x {macro-F1 [CI], tail-F1 [CI], head-F1, mAP,
  train time}, best first, random-init runs flagged, then P(top beats runner-up) and the CI of the difference;
  written to ``RUNS/compare.json`` (``RUNS/compare-<eval>.json`` for an evaluation other than ``torch``);
- across evaluations (``runtimes=["torch", "onnxruntime", "onnxruntime-fp16"]``): macro-F1 of each pair per
  evaluation, and per evaluation its difference from the first (macro-F1, max |Δprob|, decisions flipped);
  written to ``RUNS/compare-runtimes.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from bakeoff.common.io import read_json, write_json
from bakeoff.common.timing import training_seconds
from bakeoff.evaluate.bootstrap import bootstrap_indices, paired_bootstrap
from bakeoff.evaluate.metrics import binarize
from bakeoff.evaluate.score import (
    BOOTSTRAP_SEED,
    EVAL,
    LEVEL,
    METRICS,
    N_RESAMPLES,
    fmt,
    prediction_deltas,
    read_decision,
    read_eval,
    run_dirs,
    test_split,
)
from bakeoff.train.data.dataset import load_dataset
from bakeoff.train.run import CONFIG, TIMING, RunError
from bakeoff.train.weights import RANDOM_FLAG

COMPARE = "compare.json"


def find_eval(run_dir: Path, runtime: str, precision: str | None = None) -> str | None:
    """The eval directory name of ``runtime`` at ``precision`` (its default when None) in ``run_dir``, if any."""
    if precision is None:
        return runtime if (run_dir / EVAL / runtime / METRICS).exists() else None
    for name in (f"{runtime}-{precision}", runtime):
        path = run_dir / EVAL / name / METRICS
        if path.exists() and read_json(path)["precision"] == precision:
            return name
    return None


def table_row(metrics: dict, run_dir: Path) -> dict:
    """The compare-table fields of one metrics.json of ``run_dir``."""
    timing = run_dir / TIMING  # the run's timing as it is now (metrics.json's copy may predate a fix)
    seconds = training_seconds(read_json(timing)) if timing.exists() else metrics["training"]["seconds"]
    row = {"pair": metrics["pair"], "eval": metrics["eval"], "status": metrics["status"],
           "random_init": metrics["random_init"], "train_seconds": seconds}
    if metrics["status"] != "scored":
        return row | {"reason": metrics["reason"]}
    tail = metrics["buckets"]["tail"]
    return row | {"macro_f1": metrics["macro_f1"], "macro_f1_ci": metrics["ci"]["macro_f1"],
                  "tail_f1": tail["macro_f1"], "tail_f1_ci": metrics["ci"]["tail_macro_f1"],
                  "head_f1": metrics["buckets"]["head"]["macro_f1"], "map": metrics["macro_ap"],
                  "n_tail_scored": tail["n_tags_scored"], "n_test": metrics["test"]["n_images"]}


def _sort_key(row: dict) -> tuple:
    scored = row["status"] == "scored" and row["macro_f1"] is not None
    return (not scored, -row["macro_f1"] if scored else 0.0, row["pair"])


def verdict(runs_dir: Path, a: dict, b: dict, data: str | Path | None = None) -> dict:
    """Paired bootstrap of macro-F1, run ``a`` minus run ``b`` (table rows), on the shared seeded resamples."""
    ma, pa = read_eval(runs_dir / a["pair"], a["eval"])
    mb, pb = read_eval(runs_dir / b["pair"], b["eval"])
    ds = load_dataset(data or ma["dataset"]["path"])
    _, y_true, test_hash = test_split(ds)
    for m in (ma, mb):
        if (m["dataset"]["hash"], m["test"]["ids_sha256"]) != (ds.content_hash(), test_hash):
            raise RunError(f"{runs_dir / m['pair'] / EVAL / m['eval'] / METRICS}: scored on another dataset or test "
                           f"split than {ds.root}; re-evaluate it")
    preds = [binarize(p, read_decision(runs_dir / m["pair"], ds.taxonomy)) for m, p in ((ma, pa), (mb, pb))]
    res = paired_bootstrap(y_true, *preds, bootstrap_indices(len(y_true), N_RESAMPLES, BOOTSTRAP_SEED), level=LEVEL)
    lo, hi = res["ci"]
    separated = not lo <= 0 <= hi
    if separated:
        winner, loser = (a, b) if lo > 0 else (b, a)
        conclusion = f"{winner['pair']} beats {loser['pair']}"
    else:
        conclusion = "cannot be separated (the CI of the difference contains 0)"
    return {"a": a["pair"], "b": b["pair"], **res, "separated": separated, "conclusion": conclusion,
            "random_init": a["random_init"] or b["random_init"], "dataset": str(ds.root)}


def fmt_ci(value: float | None, ci: list | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else f"{value:.3f}"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def render(header: Sequence[str], body: list[list[str]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in [list(header), *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [list(header), *body])


def single_text(name: str, rows: list[dict], verdict_: dict | None) -> str:
    body = []
    for r in rows:
        flag = "*" if r["random_init"] else ""
        if r["status"] != "scored":
            body.append([r["pair"] + flag, f"{r['status'].upper()}: {r['reason']}", "", "", "",
                         fmt_seconds(r["train_seconds"])])
            continue
        body.append([r["pair"] + flag, fmt_ci(r["macro_f1"], r["macro_f1_ci"]), fmt_ci(r["tail_f1"], r["tail_f1_ci"]),
                     fmt(r["head_f1"], 3), fmt(r["map"], 3), fmt_seconds(r["train_seconds"])])
    lines = [f"Test scores ({name}; {LEVEL:.0%} bootstrap CIs over {N_RESAMPLES} paired resamples), best first",
             render(("pair", "macro-F1 [CI]", "tail-F1 [CI]", "head-F1", "mAP", "train time"), body)]
    if any(r["random_init"] for r in rows):
        lines.append(f"* {RANDOM_FLAG}")
    if verdict_:
        v = verdict_
        lines.append(f"Top two: {v['a']} - {v['b']}: macro-F1 difference {v['observed_diff']:+.4f}, "
                     f"{v['level']:.0%} CI [{v['ci'][0]:+.4f}, {v['ci'][1]:+.4f}], P({v['a']} better) = "
                     f"{v['p_a_better']:.3f} -> {v['conclusion']}" + (f" ({RANDOM_FLAG})" if v["random_init"] else ""))
    return "\n".join(lines)


def compare_single(runs_dir: Path, runtime: str, precision: str | None,
                   data: str | Path | None) -> tuple[list[dict], str, dict]:
    rows = []
    for run_dir in run_dirs(runs_dir):
        name = find_eval(run_dir, runtime, precision)
        if name is not None:
            rows.append(table_row(read_eval(run_dir, name, predictions=False)[0], run_dir))
    rows.sort(key=_sort_key)
    label = runtime if precision is None else f"{runtime} {precision}"
    if not rows:
        raise RunError(f"{runs_dir}: no run has a {label} evaluation; run `python -m evaluate --runs {runs_dir} ...`")
    scored = [r for r in rows if r["status"] == "scored" and r["macro_f1"] is not None]
    v = verdict(runs_dir, scored[0], scored[1], data) if len(scored) >= 2 else None
    return rows, single_text(label, rows, v), {"eval": label, "rows": rows, "verdict": v}


def compare_across(runs_dir: Path, evals: Sequence[str]) -> tuple[list[dict], str, dict]:
    ref_name, others = evals[0], list(evals[1:])
    rows, body = [], []
    for run_dir in run_dirs(runs_dir):
        found = {e: read_eval(run_dir, e) for e in evals}
        if all(f is None for f in found.values()):
            continue
        row = {"pair": run_dir.name, "macro_f1": {}, "status": {}, "vs_" + ref_name: {}}
        for e, f in found.items():
            row["status"][e] = "missing" if f is None else f[0]["status"]
            row["macro_f1"][e] = f[0].get("macro_f1") if f else None
        ref = found[ref_name]
        cells = [run_dir.name, fmt(row["macro_f1"][ref_name]) if ref else row["status"][ref_name]]
        for e in others:
            f = found[e]
            if ref and f and ref[1] is not None and f[1] is not None:
                decision = read_decision(run_dir, read_json(run_dir / CONFIG)["taxonomy"])
                d = row["vs_" + ref_name][e] = prediction_deltas(ref[0], ref[1], f[0], f[1], decision)
                # round, then + 0.0: a -1e-9 difference prints +0.0000, not -0.0000
                cells.append(f"{fmt(f[0]['macro_f1'])} ({round(d['macro_f1'], 4) + 0.0:+.4f}; max|dp| {d['max_abs_prob']:.1e}; "
                             f"flipped {d['decisions_flipped']:.2%})")
            else:
                cells.append(fmt(f[0].get("macro_f1")) if f and f[0]["status"] == "scored" else row["status"][e])
        rows.append(row)
        body.append(cells)
    if not rows:
        raise RunError(f"{runs_dir}: no run has any of the evaluations {', '.join(evals)}")
    text = "\n".join([f"Test macro-F1 per evaluation; in brackets: difference vs {ref_name}, max |Δprob|, "
                      "share of tag decisions flipped",
                      render(("pair", *evals), body)])
    return rows, text, {"reference": ref_name, "evals": list(evals), "rows": rows}


def compare_table(runs_dir: str | Path, runtime: str = "torch", precision: str | None = None, *,
                  data: str | Path | None = None, runtimes: Sequence[str] | None = None,
                  write: bool = True) -> tuple[list[dict], str]:
    """(rows, printable text) comparing the evaluated runs under ``runs_dir``; also written as JSON (atomic).

    With ``runtimes`` (eval directory names, the first one the reference) the table compares evaluations of
    each pair instead. ``data`` overrides the dataset the verdict reads test labels from (default: the one
    recorded in the top run's metrics.json).
    """
    runs_dir = Path(runs_dir)
    if runtimes:
        rows, text, doc = compare_across(runs_dir, runtimes)
        out = runs_dir / "compare-runtimes.json"
    else:
        rows, text, doc = compare_single(runs_dir, runtime, precision, data)
        out = runs_dir / (COMPARE if doc["eval"] == "torch" else f"compare-{doc['eval'].replace(' ', '-')}.json")
    if write:
        write_json(out, doc)
    return rows, text
