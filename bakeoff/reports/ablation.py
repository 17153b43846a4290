"""The long-tail methods section: each method against the plain baseline, per backbone (``eval/ablation.json``).

Reads the files :mod:`evaluate.ablation` writes (``RUNS/<pair>/eval/ablation.json``, one per linear-probe run)
and nothing else: one table per backbone with each variant's test macro-F1 and long-tail macro-F1 (95% BCa CIs),
its paired-bootstrap difference from the baseline [95% CI] and the verdict: a method **helps** only when the CI
of its difference lies above 0, **hurts** when it lies below 0, and otherwise **does not help**; beside them each
variant's cross-fitted validation long-tail macro-F1 (± bootstrap SE), on which the re-sampling (cRT) choice is
made and shown, never on test. An ablation of an earlier checkpoint than the run's current one is left out and
said so.

    analysis = ablation.analyse(pairs)   # pairs: reports.artifacts.load_pairs(runs_dir)
    blocks = ablation.blocks(analysis)   # a list of reports.document blocks (no heading)
"""
from __future__ import annotations

from pathlib import Path

from bakeoff.common.io import read_json, sha256_file
from bakeoff.reports import fmt
from bakeoff.reports.artifacts import EVAL, MODEL, RANDOM_INIT, Pair, ReportError, dig, pair_label
from bakeoff.reports.document import Block, Para, Table

ABLATION = "ablation.json"  # = evaluate.ablation.ABLATION (reports import no model code)
METRICS = {"macro_f1": "macro-F1", "tail_f1": "long-tail macro-F1"}
HELPS, NO_HELP, HURTS = "helps", "does not help", "hurts"
COMMAND = "python -m evaluate.ablation --runs RUNS --data DATASET"


def _path(pair: Pair) -> Path:
    return pair.dir / EVAL / ABLATION


def _checkpoint_sha(pair: Pair) -> str | None:
    """The run's checkpoint hash now: from its current PyTorch evaluation (already checked against the file when
    the pairs were loaded), else hashed here."""
    ref = pair.reference
    recorded = dig(ref.doc, "run.model_sha256") if ref is not None else None
    if recorded:
        return recorded
    path = pair.dir / MODEL
    return sha256_file(path) if path.is_file() else None


def _row(name: str, v: dict, baseline: str) -> dict:
    out = {"variant": name, "what": v["what"], "selected": v["selected"], "fixed": v["fixed"],
           "shared_head_with": dig(v, "head.shared_with"), "validation": v.get("validation")}
    for metric in METRICS:
        s = v["test"][metric]
        vs = s["vs_baseline"]
        out[metric] = {"value": s["value"], "ci": s["ci"], "n_tags_scored": s["n_tags_scored"],
                       "delta": vs["delta"], "delta_ci": vs["ci"], "p_better": vs["p_better"],
                       "verdict": None if name == baseline else vs["verdict"]}
    return out


def analyse(pairs: list[Pair]) -> dict:
    """Per linear-probe pair with a current ablation.json: its variants' test scores, differences from the
    baseline and verdicts (JSON-able, each number with its source file relative to the runs directory); probe
    pairs without one, or with one of an earlier checkpoint, are listed with the reason."""
    backbones, missing = [], []
    for pair in pairs:
        if pair.strategy != "probe" or not pair.complete:
            continue
        path = _path(pair)
        rel = f"{pair.name}/{EVAL}/{ABLATION}"
        if not path.is_file():
            missing.append({"pair": pair.name, "reason": f"no {rel}: run `{COMMAND} --pairs {pair.name}`"})
            continue
        try:
            doc = read_json(path)
        except ValueError as e:
            raise ReportError(f"{path}: not valid JSON ({e})") from e
        if dig(doc, "run.model_sha256") != _checkpoint_sha(pair):
            missing.append({"pair": pair.name, "reason": f"{rel} is stale (the checkpoint changed since it was "
                                                         f"written): rerun `{COMMAND} --pairs {pair.name} --force`"})
            continue
        baseline = doc["baseline"]
        backbones.append({
            "pair": pair.name, "family": pair.family, "label": pair_label(pair), "model": dig(doc, "run.model"),
            "random_init": bool(doc.get("random_init")), "source": rel, "baseline": baseline,
            "n_test": dig(doc, "test.n_images"), "long_tail": doc.get("long_tail", {}),
            "bootstrap": doc.get("bootstrap", {}), "skipped": doc.get("skipped", {}),
            "rows": [_row(name, v, baseline) for name, v in doc["variants"].items()],
            "reproduces_run": doc.get("reproduces_run"),
            "rebalance": doc.get("rebalance_on_validation"),
        })
    return {"backbones": backbones, "missing": missing}


def _selected(row: dict) -> str:
    sel, fixed = row["selected"], row["fixed"]
    parts = [f"weight decay {sel['weight_decay']:g}"]
    for key, label in (("tau", "tau"), ("shrink", "shrink")):
        if fixed.get(key) is None:  # selected on validation
            parts.append(f"{label} {sel[key]:g}")
    return ", ".join(parts)


def _validation(row: dict) -> str:
    """``0.312 ± 0.021``: the cross-fitted validation long-tail macro-F1 and its standard error."""
    val = row["validation"] or {}
    se = val.get("tail_f1_crossfit_se")
    return fmt.num(val.get("tail_f1_crossfit")) + ("" if se is None else f" ± {fmt.num(se)}")


def _rebalance(rebalance: dict | None) -> str:
    """``Re-sampling chosen on validation (rule): crt vs baseline, long-tail F1 0.312 vs 0.280: **crt**; ...``"""
    if not rebalance or not rebalance.get("choices"):
        return ""
    said = [f"{c['with']} vs {c['without']}, validation long-tail F1 {fmt.num(c['val_tail_f1'][c['with']])} vs "
            f"{fmt.num(c['val_tail_f1'][c['without']])}: **{c['choice']}**" for c in rebalance["choices"]]
    return f"Re-sampling chosen on validation ({rebalance['rule']}): " + "; ".join(said) + "."


def _verdict(verdict: str | None) -> str:
    if verdict is None:
        return "(baseline)"
    return f"**{verdict}**" if verdict in (HELPS, HURTS) else verdict


def _cells(row: dict, metric: str, baseline: bool) -> list[str]:
    s = row[metric]
    delta = fmt.DASH if baseline or s["delta"] is None else (
        fmt.signed_ci(s["delta"], s["delta_ci"]) if s["delta_ci"] and s["delta_ci"][0] is not None
        else fmt.signed(s["delta"]))
    return [fmt.with_ci(s["value"], s["ci"]), delta, _verdict(s["verdict"])]


def _summary(b: dict) -> str:
    """``Helps: field+la (tail). Hurts: asl (overall, tail). Does not help: ...``"""
    by: dict[str, list[str]] = {HELPS: [], HURTS: [], NO_HELP: []}
    for row in b["rows"]:
        if row["variant"] == b["baseline"]:
            continue
        verdicts = {m: row[m]["verdict"] for m in METRICS}
        for v in by:
            where = [("overall" if m == "macro_f1" else "tail") for m in METRICS if verdicts[m] == v]
            if where and (v != NO_HELP or len(where) == len(METRICS)):
                by[v].append(row["variant"] + ("" if v == NO_HELP else f" ({', '.join(where)})"))
    words = {HELPS: "Helps", HURTS: "Hurts", NO_HELP: "Does not help on either measure"}
    return " ".join(f"{words[v]}: {', '.join(names)}." for v, names in by.items() if names) or ""


def _reproduction(rep: dict | None) -> str:
    """``field+la+shrink is this run's own configuration; retrained here it gives the run's head ...``"""
    if not rep:
        return ""
    text = (f"{rep['variant']} is the run's own configuration; retrained here, its head differs from the "
            f"checkpoint's by at most {rep['max_abs_head_diff']:.1e}, tau {fmt.num(rep['tau']['ablation'], 2)} "
            f"(run: {fmt.num(rep['tau']['run'], 2)}), shrinkage {fmt.num(rep['shrink']['ablation'], 1)} "
            f"(run: {fmt.num(rep['shrink']['run'], 1)})")
    ref = rep.get("test_macro_f1")
    if ref:
        text += (f"; test macro-F1 {fmt.num(ref['ablation'], 4)} (the run's eval/torch: "
                 f"{fmt.num(ref['eval/torch'], 4)})")
    return text + "."


def blocks(analysis: dict) -> list[Block]:
    """The section's paragraphs and one table per backbone (no heading: the caller adds it)."""
    out: list[Block] = []
    if not analysis["backbones"]:
        why = "; ".join(f"{m['pair']}: {m['reason']}" for m in analysis["missing"])
        return [Para("No long-tail ablation to show" + (f" ({why})." if why else
                                                         f": no linear-probe run has one (`{COMMAND}`)."))]
    first = analysis["backbones"][0]
    boot = first["bootstrap"]
    out.append(Para(
        f"Each long-tail method against the plain baseline ({first['baseline']}: a sigmoid BCE head with per-tag "
        "thresholds fitted on validation), on the same frozen features of each backbone, with the run's own "
        "weight-decay grid and epochs; every choice (weight decay, tau, shrinkage, thresholds, re-sampling) is made "
        "on validation, and the test split is used once, for scoring. Differences are paired bootstraps over the test "
        f"images ({boot.get('n_resamples', 1000)} resamples, {boot.get('level', 0.95):.0%} BCa CI). A method "
        f"**{HELPS}** only when the CI of its difference from the baseline lies above 0, **{HURTS}** when it lies "
        f"below 0, and otherwise {NO_HELP}. Long tail: {first['long_tail'].get('definition', 'rare tags')}."))
    header = ["method", "test macro-F1 [95% CI]", "Δ vs baseline [95% CI]", "verdict",
              "long-tail F1 [95% CI]", "Δ vs baseline [95% CI]", "verdict", "validation long-tail F1 ± SE",
              "selected on validation"]
    for b in analysis["backbones"]:
        name = b["label"] + (RANDOM_INIT if b["random_init"] else "")
        lead = f"**{name}** ({b['pair']}, {b['model']}; {b['n_test']:,} test images). {_summary(b)}"
        if b["random_init"]:
            lead += " Random init: not a valid comparison of the methods on the pretrained backbone."
        out.append(Para(lead))
        rows = [[r["variant"], *_cells(r, "macro_f1", r["variant"] == b["baseline"]),
                 *_cells(r, "tail_f1", r["variant"] == b["baseline"]), _validation(r), _selected(r)]
                for r in b["rows"]]
        notes = ["What each method is: " + "; ".join(f"{r['variant']}: {r['what']}" for r in b["rows"]) + "."]
        shared = [f"{r['variant']} reuses {r['shared_head_with']}'s head" for r in b["rows"] if r["shared_head_with"]]
        if shared:
            notes.append("Same head, other decision rule: " + ", ".join(shared) + ".")
        notes += [f"Not run: {k} ({why})." for k, why in b["skipped"].items()]
        if rep := _reproduction(b.get("reproduces_run")):
            notes.append(rep)
        if chosen := _rebalance(b.get("rebalance")):
            notes.append(chosen)
        notes.append(f"Source: {b['source']}.")
        out.append(Table(header, rows, notes))
    if analysis["missing"]:
        out.append(Para("No ablation shown for " + "; ".join(f"{m['pair']}: {m['reason']}"
                                                             for m in analysis["missing"]) + "."))
    return out
