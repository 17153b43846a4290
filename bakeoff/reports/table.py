"""The main table: one row per pair, every cell from an artifact, every gap a dash with a footnote.

Each row also returns its numbers as :class:`~reports.artifacts.Sourced` values (for summary.json).
"""
from __future__ import annotations

from bakeoff.common.timing import TIMING_TOTALS
from bakeoff.reports import fmt
from bakeoff.reports.artifacts import (
    MODEL,
    NO_ENGINE,
    PARITY,
    REFERENCE_EVAL,
    RUNTIMES,
    Latency,
    Pair,
    Sourced,
    eval_label,
    export_eval_name,
    macro_f1_delta,
    outside_tolerance,
    pair_label,
    parity_eval_name,
    runtime_label,
    tolerances,
    training_cost,
)
from bakeoff.reports.document import Cell, Table
from bakeoff.reports.figures import PHASES

SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


class Notes:
    """Numbered footnotes; one note per kind of gap or caveat, listing the pairs it applies to."""

    def __init__(self):
        self._notes: dict[str, list[str]] = {}

    def mark(self, text: str, pair: str) -> str:
        pairs = self._notes.setdefault(text, [])
        if pair not in pairs:
            pairs.append(pair)
        return str(list(self._notes).index(text) + 1).translate(SUPERSCRIPTS)

    def marks(self, texts: list[str], pair: str) -> str:
        """Several notes' marks on one value, comma-separated (so ¹ and ² never read as ¹²)."""
        return ",".join(self.mark(text, pair) for text in texts)

    def lines(self) -> list[str]:
        return [f"{str(i).translate(SUPERSCRIPTS)} {text}: {', '.join(pairs)}."
                for i, (text, pairs) in enumerate(self._notes.items(), start=1)]

    def as_json(self) -> list[dict]:
        return [{"note": text, "pairs": pairs} for text, pairs in self._notes.items()]


def _latency_lines(lat: Latency, pair: Pair, notes: Notes) -> tuple[list[str], dict]:
    p50, p99 = lat.latency_ms("median"), lat.latency_ms("p99")
    tput, batch = lat.throughput()
    caveats = []
    if lat.estimate:
        caveats.append("T4 ESTIMATE: a roofline projection for TensorRT fp16 on a T4 (engines.projection), "
                       "not a measurement; batch-1 figures are a lower bound")
    elif not lat.on_t4:
        caveats.append(f"latency measured on {lat.device}, not a T4")
    if lat.definition:
        caveats.append(f"latency = {lat.definition}")
    if lat.contended:
        caveats.append("other processes used the CPU during the benchmark (latency JSON: cpu_contention): "
                       "figures are pessimistic")
    marks = notes.marks(caveats, pair.name)
    if lat.estimate:
        lines = [f"T4 ESTIMATE ≈ {fmt.ms(p99.value)} ms{marks}",
                 f"({lat.precision}; ≈ {fmt.rate(tput.value)} img/s @{batch})"]
    else:
        lines = [f"{lat.precision}: {fmt.ms(p50.value)} / {fmt.ms(p99.value)} ms{marks}",
                 f"{fmt.rate(tput.value)} img/s @{batch}"]
    return lines, {"p50_ms_batch1": p50.to_json(), "p99_ms_batch1": p99.to_json(), "throughput_ips": tput.to_json(),
                  "throughput_batch": batch, "device": lat.device, "on_t4": lat.on_t4, "estimate": lat.estimate}


def latency_cell(pair: Pair, runtime: str, notes: Notes) -> tuple[Cell, dict]:
    lats = [lat for lat in pair.latencies if lat.runtime == runtime]
    if not lats:
        engine = any(name.endswith(".engine") for name in pair.export)
        hint = NO_ENGINE if runtime == "tensorrt" and not engine else "not benchmarked"
        return fmt.DASH + notes.mark(f"{runtime_label(runtime)}: {hint}; no latency/{runtime}*.json", pair.name), {}
    lines, values = [], {}
    for lat in lats:
        text, values[lat.name] = _latency_lines(lat, pair, notes)
        lines += text
    return lines, values


def worst_flips(results: dict) -> tuple[str, dict] | None:
    """parity.json's candidate with the highest decision-flip rate (its name and result); None without one."""
    rated = [(name, r) for name, r in results.items() if r.get("flip_rate") is not None]
    return max(rated, key=lambda item: item[1]["flip_rate"], default=None)


def flips_text(name: str, result: dict) -> str:
    """``14 of 65,536 decisions flipped (0.021%, ONNX Runtime fp16)``: the counts parity.json recorded for the
    candidate ``name``, with the rate to two significant digits."""
    flips, decisions = result["flips"], result["decisions"]
    rate = f"{100 * flips / decisions:.2g}%, " if flips else ""
    return f"{flips:,} of {decisions:,} decisions flipped ({rate}{eval_label(parity_eval_name(name))})"


def parity_line(pair: Pair) -> tuple[str | None, dict]:
    """The export's parity verdict (parity.json, engine sidecars): passed, with the decision flips of its worst
    graph, or what failed."""
    parity = pair.export.get(PARITY)
    if parity is None:
        return None, {}
    doc = parity.value
    results = doc.get("results", {})
    worst = worst_flips(results)
    if pair.parity_failures:
        line = "export parity FAILED: " + "; ".join(f"{eval_label(name)} ({'; '.join(f.value) or 'failed'})"
                                                    for name, f in pair.parity_failures.items())
    else:
        line = f"export parity passed on {doc.get('n_images')} images" + (f": at worst {flips_text(*worst)}"
                                                                           if worst else "")
    worst_json = None if worst is None else {"graph": worst[0], "flips": worst[1]["flips"],
                                             "decisions": worst[1]["decisions"], "flip_rate": worst[1]["flip_rate"]}
    return line, {"parity": {"value": doc.get("status"), "worst": worst_json, "source": parity.source,
                             "field": "status, results.*.flips / decisions / flip_rate"}}


def deployed_cell(pair: Pair, notes: Notes) -> tuple[Cell, dict]:
    """Macro-F1 of every other evaluation of the pair minus PyTorch fp32 (failed ones said so), a note for each
    exported model that was not evaluated, and the export's parity verdict."""
    ref = pair.reference
    others = [ev for name, ev in pair.evals.items() if name != REFERENCE_EVAL]
    parity, values = parity_line(pair)
    if ref is None:
        return [fmt.DASH + notes.mark(pair.unscored_reason(), pair.name), *([parity] if parity else [])], values
    lines = []
    for ev in others:
        if not ev.scored:
            lines.append(f"{ev.label}: FAILED ({ev.doc.get('reason', ev.doc.get('status'))[:60]})")
            values[ev.name] = {"status": ev.doc.get("status"), "source": ev.rel}
            continue
        d, tol = macro_f1_delta(ev, ref), outside_tolerance(ev, ref)
        lines.append(f"{ev.label}: {fmt.signed(d.value, 4)}" + (f" ⚠ outside ±{tol:g}" if tol is not None else "")
                     + (" (export FAILED parity)" if ev.name in pair.parity_failures else ""))
        values[ev.name] = d.to_json() | {"outside_tolerance": tol}
    unevaluated = sorted(((f, name) for f in pair.export if (name := export_eval_name(f)) and name not in pair.evals),
                         key=lambda f_name: f_name[1])
    lines += [f"{eval_label(name)}: not evaluated"
              + notes.mark(f"{f} was exported but not evaluated (no eval/{name}/)", pair.name)
              for f, name in unevaluated]
    if not lines:
        lines.append(fmt.DASH + notes.mark("nothing exported or evaluated beyond PyTorch (python -m export)",
                                           pair.name))
    values["not_evaluated"] = [f for f, _ in unevaluated]
    return lines + ([parity] if parity else []), values


def size_cell(pair: Pair) -> tuple[Cell, dict]:
    """Parameters (total, trained and their share) and the sizes of the checkpoint and exported files."""
    total, trained = pair.config.get("params_total"), pair.config.get("params_trained")
    values = {"params_total": total.to_json(), "params_trained": trained.to_json()}
    lines = [f"{fmt.count(total.value)} params"] if total.value is not None else []
    if trained.value is not None:
        share = f" ({trained.value / total.value:.{0 if trained.value >= 0.01 * total.value else 2}%})" \
            if total.value else ""
        lines.append(f"{fmt.count(trained.value)} trained{share}")
    model = pair.dir / MODEL
    if model.is_file():
        size = Sourced(model.stat().st_size, f"{pair.name}/{MODEL}", "file size (bytes)")
        values["checkpoint_bytes"] = size.to_json()
        lines.append(f"{fmt.megabytes(size.value)} checkpoint")
    for name, size in pair.export.items():
        if name.endswith((".onnx", ".engine")):
            values[name] = size.to_json()
            kind = "TensorRT engine" if name.endswith(".engine") else "FP16 ONNX" if ".fp16." in name else "ONNX"
            lines.append(f"{fmt.megabytes(size.value)} {kind}")
    return lines or fmt.DASH, values


def training_cell(pair: Pair, pairs: list[Pair], notes: Notes) -> tuple[Cell, dict]:
    """Training time (the sum of timing.json's phases, as Figure 4 draws it), its largest phases, and for a
    fine-tune started from its probe's head the cost the rule uses (fine-tune + probe)."""
    own = pair.training_time()
    if own is None:
        return fmt.DASH + notes.mark("no timing.json (training unfinished)", pair.name), {}
    parts = pair.phases
    recorded = pair.timing.get("seconds.total").value
    caveats = []
    if recorded is not None and abs(recorded - own.value) > 0.01 * max(own.value, 1.0):
        caveats.append("timing.json's total differs from the sum of its phases by more than 1% (an older run "
                       "recorded the total differently); the training time shown is the sum of the phases")
    if pair.reused_caches:
        caveats.append("includes the recorded cost of a reused cache (timing.json caches_reused)")
    lines = [f"{fmt.duration(own.value)} training time" + notes.marks(caveats, pair.name)]
    cost = training_cost(pair, pairs)
    if pair.starts_from_probe:
        lines.append(f"with probe {fmt.duration(cost.value)}" + notes.mark(
            "fine-tune starts from the linear probe's head (LP-then-FT): its training cost, used by the rule, "
            "adds the probe's time", pair.name))
    minor = ("weights_load", "image_cache", "thresholds")  # shown in Figure 4
    shown = sorted(((k, v) for k, v in parts.items() if k not in minor), key=lambda kv: -kv[1])
    lines += [f"{PHASES.get(k, k)} {fmt.duration(v)}" for k, v in shown]
    return lines, {"training_seconds": own.to_json(), "cost_seconds": cost.to_json(),
                   "phases_seconds": {k: {"value": v, "source": pair.timing.rel, "field": f"seconds.{k}"}
                                      for k, v in parts.items()},
                   "device": pair.timing.get("device").to_json()}


def accuracy_cells(pair: Pair, notes: Notes) -> tuple[list[Cell], dict]:
    """Macro-F1 [CI], long-tail F1 [CI], medium / head F1, mAP of the PyTorch fp32 evaluation."""
    ref = pair.reference
    if ref is None:
        return [fmt.DASH + notes.mark(pair.unscored_reason(), pair.name)] * 4, {}
    values, cells = {}, {}
    for key, field, ci_field in (("macro_f1", "macro_f1", "macro_f1"), *[
            (f"{b}_f1", f"buckets.{b}.macro_f1", f"{b}_macro_f1") for b in ("tail", "medium", "head")]):
        v, ci = ref.get(field), ref.get(f"ci.{ci_field}")
        values[key] = v.to_json() | {"ci": ci.value}
        cells[key] = (fmt.with_ci(v.value, ci.value).replace(" [", "\n[") if key in ("macro_f1", "tail_f1")
                      else fmt.num(v.value))
        if v.value is None:
            cells[key] += notes.mark(f"{key.split('_')[0]}: no tag of this bucket has a test positive", pair.name)
    m = ref.get("macro_ap")
    values["map"] = m.to_json()
    return [cells["macro_f1"].split("\n"), cells["tail_f1"].split("\n"), f"{cells['medium_f1']} / {cells['head_f1']}",
            fmt.num(m.value)], values


def main_table(pairs: list[Pair]) -> tuple[Table, dict]:
    """The table of every pair (best macro-F1 first) and its numbers with their sources."""
    notes = Notes()
    ranked = sorted(pairs, key=lambda p: -(p.reference.doc["macro_f1"] if p.reference and p.reference.doc.get(
        "macro_f1") is not None else -1.0))
    estimated = any(lat.estimate for p in pairs for lat in p.latencies)
    header = ["Pair", "Macro-F1 [95% CI]", "Long-tail F1 [95% CI]", "Medium / head F1", "mAP", "Training time",
              *[f"{runtime_label(r)} latency" + (" (measured, or T4 ESTIMATE)" if r == "tensorrt" and estimated else "")
                for r in RUNTIMES], "FP16 / engine Δ macro-F1", "Size"]
    rows, summary = [], {}
    for pair in ranked:
        name: list[str] = [f"**{pair.name}**", pair_label(pair)]
        if pair.random_init:
            name += ["⚠ random init —", "not a valid comparison"]
        acc, values = accuracy_cells(pair, notes)
        values |= {"random_init": pair.random_init, "weights": pair.config.get("weights").to_json()}
        train, values["training"] = training_cell(pair, pairs, notes)
        lat_cells = []
        values["latency"] = {}
        for runtime in RUNTIMES:
            cell, values["latency"][runtime] = latency_cell(pair, runtime, notes)
            lat_cells.append(cell)
        deployed, values["deployed_delta"] = deployed_cell(pair, notes)
        size, values["size"] = size_cell(pair)
        rows.append([name, *acc, train, *lat_cells, deployed, size])
        summary[pair.name] = values
    legend = ("Accuracy: test split, PyTorch fp32, 95% BCa bootstrap CIs over the test images (metrics.json ci). "
              "Training time: the sum of timing.json's "
              f"phases (every seconds.* entry but {' and '.join(TIMING_TOTALS)}), as in Figure 4. Latency cells: "
              "precision: p50 / p99 ms at batch 1, then images/s at the largest batch benchmarked (@batch). "
              "FP16 / engine Δ: macro-F1 of each exported or reduced-precision evaluation minus PyTorch fp32; ⚠ marks "
              f"one outside the export tolerance ({tolerances()}).")
    return Table(header, rows, [legend, *notes.lines()]), {"pairs": summary, "notes": notes.as_json()}
