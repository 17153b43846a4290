"""Build the report directory from a runs directory: report.md, report.html, figures/*.png, summary.json.

Reads artifact files only (reports.artifacts); the one computation beyond reading is the paired bootstrap
(reports.paired), on the stored predictions and the dataset's test labels.
"""
from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bakeoff.common.io import write_text
from bakeoff.reports import ablation, figures, fmt, longtail, protocol, setup
from bakeoff.reports.artifacts import (
    BUCKETS_TITLE,
    MACRO_F1_TOLERANCE,
    REFERENCE_EVAL,
    Pair,
    load_pairs,
    macro_f1_delta,
    outside_tolerance,
)
from bakeoff.reports.document import (
    Block,
    Code,
    Figure,
    Heading,
    Para,
    Table,
    to_html,
    to_markdown,
)
from bakeoff.reports.paired import comparer_for
from bakeoff.reports.provenance import blocks as provenance_blocks
from bakeoff.reports.provenance import provenance
from bakeoff.reports.rule import CROSSFIT, OLD_VAL_MAP, SELECTION, VAL_METRICS, Constraints, recommend
from bakeoff.reports.table import main_table

FIGURES = "figures"
LATENCY_FIG, BUCKET_FIG = "1_latency_vs_macro_f1.png", "2_f1_by_frequency_bucket.png"
TAG_FIG, TIME_FIG, DEPLOYED_FIG = ("3_per_tag_f1_vs_frequency.png", "4_training_time_by_phase.png",
                                   "5_deployed_vs_pytorch.png")


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _scored(pairs: list[Pair]) -> list[Pair]:
    return [p for p in pairs if p.reference is not None]


def latency_points(pairs: list[Pair]) -> list[dict]:
    """Figure 1's points: each benchmark (or T4 estimate) with a batch-1 p99, at the macro-F1 of the same runtime's
    evaluation where it was scored (``accuracy`` "own"); of PyTorch fp32 where that runtime was not evaluated
    ("pytorch"); none where its evaluation failed ("failed": not drawn, not on the front). ``parity_failed``:
    the runtime's exported model failed parity (drawn crossed out, not on the front)."""
    points = []
    for p in _scored(pairs):
        for lat in p.latencies:
            p99 = lat.latency_ms("p99")
            if p99.value is None:
                continue
            ev = p.evaluation_for(lat)
            accuracy = "pytorch" if ev is None else "own" if ev.scored else "failed"
            source = p.reference if ev is None else ev
            points.append({"pair": p.name, "family": p.family, "strategy": p.strategy, "random_init": p.random_init,
                           "runtime": lat.runtime, "label": lat.label,
                           "latency_ms": p99.value, "macro_f1": source.doc.get("macro_f1"), "accuracy": accuracy,
                           "estimate": lat.estimate, "parity_failed": lat.eval_name in p.parity_failures,
                           "sources": [p99.source, source.rel]})
    return points


def bucket_rows(pairs: list[Pair]) -> tuple[list[dict], list[tuple[str, str]]]:
    rows = []
    for p in _scored(pairs):
        values = {}
        for b in BUCKETS_TITLE:
            v, ci = p.reference.get(f"buckets.{b}.macro_f1").value, p.reference.get(f"ci.{b}_macro_f1").value
            values[b] = (v, *(ci if ci and ci[0] is not None else (None, None)))
        rows.append({"pair": p.name, "family": p.family, "strategy": p.strategy, "random_init": p.random_init,
                     "values": values})
    ref = _scored(pairs)[0].reference
    titles = []
    for b, title in BUCKETS_TITLE.items():
        lo, hi = ref.get(f"buckets.{b}.train_count_range").value or (None, None)
        span = f"< {hi}" if lo in (0, None) else f"≥ {lo}" if hi is None else f"{lo}–{hi - 1}"
        titles.append((b, f"{title} ({span} training images)"))
    return rows, titles


def per_tag_series(pairs: list[Pair]) -> tuple[list[dict], int]:
    """Figure 3's series and how many tags were left out (no training image: no place on a log axis)."""
    series, dropped = [], 0
    for p in _scored(pairs):
        rows = [r for r in p.reference.per_tag if r["f1"] is not None]
        keep = [r for r in rows if r["train_count"] >= 1]
        dropped = max(dropped, len(rows) - len(keep))
        series.append({"pair": p.name, "family": p.family, "strategy": p.strategy, "random_init": p.random_init,
                       "train_count": [r["train_count"] for r in keep], "f1": [r["f1"] for r in keep]})
    return series, dropped


def training_rows(pairs: list[Pair]) -> list[dict]:
    """Figure 4's bars: each timed pair's phases (their sum is the training time the table shows)."""
    return [{"pair": p.name, "random_init": p.random_init, "phases": p.phases} for p in pairs if p.timing is not None]


def other_phases_caption(rows: list[dict], minor: list[str]) -> str:
    """What Figure 4's "other" bar segment holds, and how long it is per pair."""
    if not minor:
        return ""
    totals = [r["phases"][figures.OTHER_PHASES] for r in rows]
    return (f" \"{figures.PHASE_LABELS[figures.OTHER_PHASES]}\" sums the phases too short to see "
            f"({', '.join(figures.PHASES.get(k, k) for k in minor)}): {fmt.duration(min(totals))} to "
            f"{fmt.duration(max(totals))} per pair.")


def deployed_rows(pairs: list[Pair]) -> tuple[list[dict], dict[float, str]]:
    """Figure 5's rows (each exported or reduced-precision evaluation's macro-F1 minus PyTorch fp32's; None for a
    failed one), and the tolerances of the precisions present, with those precisions in words."""
    rows, precisions = [], []
    for p in _scored(pairs):
        others = [ev for name, ev in p.evals.items() if name != REFERENCE_EVAL]
        deltas = {ev.label: macro_f1_delta(ev, p.reference).value if ev.scored else None for ev in others}
        if deltas:
            rows.append({"pair": p.name, "random_init": p.random_init, "deltas": deltas,
                         "outside_tolerance": [ev.label for ev in others
                                               if outside_tolerance(ev, p.reference) is not None]})
        precisions += [ev.doc.get("precision") for ev in others]
    tolerances: dict[float, list[str]] = {}
    for precision, tol in MACRO_F1_TOLERANCE.items():
        if precision in precisions:
            tolerances.setdefault(tol, []).append(precision)
    return rows, {tol: " / ".join(names) for tol, names in tolerances.items()}


def draw(pairs: list[Pair], out_dir: Path, subset: str) -> tuple[dict[str, Figure], list[str], list[dict]]:
    """The figures that the artifacts allow (by file name), a sentence for each one that they do not, and
    Figure 1's points (each with the files its two coordinates come from). ``subset`` says when the runs trained
    on part of the train split whose counts Figures 2 and 3 use."""
    made: dict[str, Figure] = {}
    skipped: list[str] = []

    def add(name: str, caption: str, draw_fn, *args) -> None:
        made[name] = Figure(draw_fn(*args, out_dir / FIGURES / name), f"{FIGURES}/{name}", caption)

    if not _scored(pairs):
        return made, ["No figure: no pair has a scored PyTorch evaluation (python -m evaluate)."], []
    points = latency_points(pairs)
    if figures.plotted(points):
        failed = [f"{p['pair']} on {p['label']}" for p in points if p["accuracy"] == "failed"]
        parity = [f"{p['pair']} on {p['label']}" for p in figures.plotted(points) if p["parity_failed"]]
        add(LATENCY_FIG,
            "Figure 1. Test macro-F1 against p99 latency at batch 1, one point per (pair, runtime); colour = "
            "backbone, marker = runtime and precision, hollow = linear probe. Accuracy is the runtime's own "
            "evaluation; faded points use PyTorch fp32 accuracy because that runtime was not evaluated. The dashed "
            "line is the Pareto front of measured points; its points are numbered and listed in the legend"
            + (" (stars are T4 ESTIMATES, not measurements, and are not on the front)"
               if any(p["estimate"] for p in points) else "")
            + (f". Crossed out, and not on the front, because their export failed parity: {', '.join(parity)}"
               if parity else "")
            + (f". Not drawn, because their runtime's evaluation failed: {', '.join(failed)}" if failed else "")
            + ". Devices differ between points: see the table's footnotes.",
            figures.latency_accuracy, points)
    else:
        skipped.append("Figure 1 (accuracy vs latency) not drawn: " + (
            "every benchmarked runtime's evaluation failed." if points else
            "no latency benchmark (latency/*.json) yet (python -m engines bench)."))
    rows, titles = bucket_rows(pairs)
    add(BUCKET_FIG,
        "Figure 2. Test macro-F1 by training-frequency bucket for each pair, with 95% BCa bootstrap CI whiskers "
        "(PyTorch fp32; hatched = linear probe)." + (f" {subset}" if subset else ""),
        figures.bucket_bars, rows, titles)
    series, dropped = per_tag_series(pairs)
    threshold = _scored(pairs)[0].reference.get("buckets.tail.train_count_range.1").value
    add(TAG_FIG,
        f"Figure 3. Per-tag test F1 against training images per tag in the train split (log scale), one colour per "
        f"backbone, lines = mean F1 in log-spaced frequency bins; dotted: the {threshold}-image long-tail threshold. "
        "Tags without a test positive have no F1 and are not shown" + (f"; {dropped} tags with no training image "
                                                                       "are left off the log axis" if dropped else "")
        + "." + (f" {subset}" if subset else ""),
        figures.per_tag_f1, series, threshold)
    timed, minor = figures.merge_minor_phases(training_rows(pairs))
    if timed:
        add(TIME_FIG,
            "Figure 4. Training time by phase (timing.json; a bar is the pair's training time, as in the table); "
            "feature extraction / trunk caching (light grey) run the frozen backbone once over the training and "
            "validation images, head training / block fine-tuning (dark grey) train on them. A fine-tune's bar leaves "
            "out the linear probe it starts from, which the rule's training cost adds."
            + other_phases_caption(timed, minor), figures.training_time, timed)
    deployed, tolerances = deployed_rows(pairs)
    if deployed:
        outside = [f"{r['pair']} on {label}" for r in deployed for label in r["outside_tolerance"]]
        add(DEPLOYED_FIG,
            "Figure 5. Macro-F1 of each exported or reduced-precision evaluation minus PyTorch fp32, per pair "
            "(same test images and thresholds); a cross marks an evaluation that failed (NaN/Inf outputs). Dotted "
            "lines: the export tolerance, "
            + ", ".join(f"±{tol:g} for {names}" for tol, names in tolerances.items())
            + (f"; outside it: {', '.join(outside)}" if outside else "; every evaluation is inside it") + ".",
            figures.deployed_delta, deployed, tolerances)
    else:
        skipped.append("Figure 5 (deployed vs PyTorch accuracy) not drawn: no exported-model evaluation yet "
                       "(python -m export, then python -m evaluate --runtime onnxruntime).")
    return made, skipped, points


def selection_table(rec: dict) -> Table:
    """The recommendation's table: each pair's validation metric (what the rule chose on) beside its test scores
    (reported only), its judged latency and training cost, and what the rule did with it. Notes are plain
    sentences (no footnote marks: those number the main table's notes)."""
    metric = rec["selection_metric"]
    header = ["Pair", f"Validation {metric}: {VAL_METRICS[metric]} (chooses)" if metric else "Validation (chooses)",
              "Validation long-tail F1 (cross-fitted)", "Test macro-F1 [95% CI] (reported only)",
              "Test long-tail F1 [95% CI] (reported only)", "p99 at batch 1 (judged runtime)", "Training cost",
              "Rule"]
    rows = []
    for r in rec["validation"]:
        val, test, lat = r["validation"], r["test"], r["latency"]
        pair = [f"**{r['pair']}**"] + (["random init"] if r["random_init"] else [])
        chosen_on = r["selection_value"]
        if chosen_on is not None:
            cell = [fmt.num(chosen_on["value"])]
            se = val["se"].get(metric) if metric else None
            cell += [f"± {fmt.num(se['value'])} (SE)"] if se else []
            if not chosen_on["field"].startswith(SELECTION):  # the validation mAP training selected on
                cell.append(f"from {chosen_on['field']}" + (" (older run)" if val["tail"] is None else ""))
        else:
            cell = [fmt.DASH, f"records only {', '.join(val['scores'])}" if val["scores"] else "none recorded"]
        tail = val["tail"]
        tail_cell = ([fmt.DASH, "not recorded"] if tail is None else
                     [fmt.DASH, "undefined (no long-tail validation positive)"] if tail["value"] is None else
                     fmt.num(tail["value"]))
        test_cells = ([[fmt.with_ci(test["macro_f1"]["value"], test["ci"]), test["evaluation"]],
                       fmt.with_ci(test["tail_f1"]["value"], test["tail_ci"])] if test else [fmt.DASH, fmt.DASH])
        lat_cell = ([f"{fmt.ms(lat['p99_ms_batch1']['value'])} ms", lat["label"]] if lat else fmt.DASH)
        cost = fmt.duration(r["cost"]["value"]) if r["cost"] else fmt.DASH
        outcome = f"**{r['outcome']}**" if r["outcome"] in ("recommended", "runner-up") else r["outcome"]
        rows.append([pair, cell, tail_cell, *test_cells, lat_cell, cost, [outcome] + ([r["reason"]] if r["reason"]
                                                                                        else [])])
    notes = [f"Selected on validation ({metric or 'no candidate'}); test reported once, not used to choose. Rows "
             "are ordered by the validation metric; test scores are those of the evaluation each pair is judged on "
             "(named under the value)."]
    hows = {r["validation"]["how"] for r in rec["validation"] if r["validation"]["how"]}
    notes += [f"{SELECTION} in words (config.json): {how}." for how in sorted(hows)]
    if rec["fallback_to_val_map"]:
        notes.append(f"Judged on validation mAP, not the cross-fitted macro-F1, because "
                     f"{', '.join(rec['fallback_to_val_map'])} record no {CROSSFIT} in config.json's {SELECTION}; "
                     f"where {SELECTION}.val_map is absent the mAP is the one training selected on, "
                     f"{' or '.join(OLD_VAL_MAP)}.")
    return Table(header, rows, notes)


def _title(pairs: list[Pair]) -> str:
    paths = {Path(str(p.config.doc.get("dataset", {}).get("path", ""))).name for p in pairs}
    return "Backbone bake-off" + (f": {paths.pop()}" if len(paths) == 1 and "" not in paths else "")


def compose(pairs: list[Pair], table: Table, rec: dict, tail: dict, abl: dict, figs: dict[str, Figure],
            skipped: list[str], prov: dict, created: str, training: dict) -> list[Block]:
    def fig(name: str) -> list[Block]:
        return [figs[name]] if name in figs else []

    random = [p.name for p in pairs if p.random_init]
    out: list[Block] = [Heading(_title(pairs), 1),
                        Para(f"{len(pairs)} runs, {len(_scored(pairs))} scored; generated {created} from the "
                             f"artifacts under the runs directory (every number's source file: summary.json).")]
    if random:
        out.append(Para(f"**Warning: {', '.join(random)} use random-init weights — not a valid comparison.** "
                        "Their scores measure nothing about the pretrained backbones."))
    out += [Heading("Setup"), *setup.blocks(training["rows"], training["subset"],
                                            [protocol.resolution_note(protocol.configs_of(pairs)),
                                             protocol.budget_note(protocol.configs_of(pairs))])]
    out += [Heading("Recommendation"), Code("\n".join(rec["rule"])), *[Para(t) for t in rec["text"]],
            Para("Validation (what the rule chooses on) beside test (reported once, not used to choose), every pair:"),
            selection_table(rec)]
    out += [Heading("All pairs"), table]
    for heading, name in (("Accuracy and latency", LATENCY_FIG), ("Accuracy by tag frequency", BUCKET_FIG)):
        out += [Heading(heading), *fig(name)] if name in figs else []
    subset = setup.subset_sentence(training["subset"])
    out += [Heading("The long tail"), *longtail.blocks(tail, "eval/torch/predictions.npy, per_tag.csv", subset),
            *fig(TAG_FIG), Heading("Long-tail methods: ablation"), *ablation.blocks(abl)]
    for heading, name in (("Training cost", TIME_FIG), ("Deployed accuracy", DEPLOYED_FIG)):
        out += [Heading(heading), *fig(name)] if name in figs else []
    gaps = skipped + [f"{u['pair']}: {u['reason']}" for u in rec["not_considered"]]
    if gaps:
        out += [Heading("Not in this report"), *[Para(g) for g in gaps]]
    out += provenance_blocks(prov)
    return out


def build_report(runs_dir: str | Path, out_dir: str | Path, *, latency_budget_ms: float | None = None,
                 target_runtime: str | None = None, min_tail_f1: float | None = None,
                 data: str | Path | None = None) -> dict:
    """Write the report of ``runs_dir`` into ``out_dir``; return summary.json's content.

    ``data`` is the dataset directory whose test labels the paired bootstraps use (default: the one the
    evaluations record). Raises :class:`~reports.artifacts.ReportError` for unusable artifacts and
    ``ValueError`` for bad constraints.
    """
    constraints = Constraints(latency_budget_ms, target_runtime, min_tail_f1)
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    pairs = load_pairs(runs_dir)
    comparer = comparer_for([p.reference for p in _scored(pairs)], None if data is None else str(data))
    table, table_summary = main_table(pairs)
    rec = recommend(pairs, constraints, comparer)
    tail = longtail.analyse(pairs, comparer)
    out_dir.mkdir(parents=True, exist_ok=True)
    prov = provenance(pairs)
    subset = setup.training_subset(prov)
    training = {"subset": subset, "rows": setup.setup_rows(pairs, subset)}
    figs, skipped, points = draw(pairs, out_dir, setup.subset_sentence(subset))
    created = datetime.now(UTC).isoformat(timespec="seconds")
    abl = ablation.analyse(pairs)
    blocks = compose(pairs, table, rec, tail, abl, figs, skipped, prov, created, training)
    summary = {"report": {"runs_dir": str(runs_dir.resolve()), "created": created,
                          "sources_relative_to": str(runs_dir.resolve()), "constraints": rec["constraints"]},
               "setup": training, "table": table_summary, "recommendation": rec, "long_tail": tail, "ablation": abl,
               "figures": [{"file": f.rel, "caption": f.caption} for f in figs.values()], "not_drawn": skipped,
               "latency_vs_macro_f1_points": points, "provenance": prov}
    write_text(out_dir / "report.md", to_markdown(blocks))
    write_text(out_dir / "report.html", to_html(blocks, _title(pairs)))
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
    return json.loads(json.dumps(summary, default=_json_default))
