"""The decision rule: which (backbone, strategy) pair to deploy, under constraints the user sets.

:func:`rule_lines` states the rule as the report prints it; :func:`recommend` applies it. The choice is made on
the validation split only, from the metrics training records in config.json (:func:`validation`): the
cross-fitted validation macro-F1 where every candidate records it, else the validation mAP. Test scores
(macro-F1, long-tail F1, their CIs, the paired bootstraps of :mod:`reports.paired`) are reported for every pair
and for the top two, once, and never change the choice; without the test labels the top-two comparison falls back
to overlapping 95% CIs, and says so.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from bakeoff.reports import fmt
from bakeoff.reports.artifacts import (
    NO_ENGINE,
    PRECISIONS,
    REFERENCE_EVAL,
    RUNTIMES,
    Evaluation,
    Latency,
    Pair,
    ReportError,
    Sourced,
    dig,
    eval_label,
    outside_tolerance,
    parse_run_name,
    run_name,
    tolerances,
    training_cost,
)
from bakeoff.reports.paired import Comparer

BUCKET_CI = {None: "macro_f1", "tail": "tail_macro_f1"}
RANDOM_FLAG = "random init — not a valid comparison"

# Validation metrics the rule selects on, in order of preference (config.json, written by train at training time).
SELECTION = "summary.selection"
CROSSFIT, VAL_MAP, VAL_TAIL = "val_macro_f1_crossfit", "val_map", "val_tail_f1_crossfit"
VAL_METRICS = {CROSSFIT: "cross-fitted validation macro-F1", VAL_MAP: "validation mAP"}
# where runs trained before summary.selection existed record their validation mAP: a probe's selected sweep
# setting, a fine-tune's best epoch (each the maximum training selected its checkpoint on)
OLD_VAL_MAP = ("summary.selected.val_map", "summary.result.best_val_map")
# a metric's standard error over validation images, where summary.selection records one
SE_FIELDS = {CROSSFIT: ("val_macro_f1_crossfit_se", "val_macro_f1_se"), VAL_MAP: ("val_map_se",)}
VAL_MARGIN = 0.005  # "indistinguishable on validation" when no standard error is recorded
LATENCY_TIE = 0.10  # measured p99 latencies within 10% of the fastest tied pair's count as equal
NO_VALIDATION = (f"no validation metric in config.json (neither {SELECTION} nor a validation mAP): it cannot be "
                 "recommended, and its test scores do not stand in")


@dataclass(frozen=True)
class Constraints:
    latency_budget_ms: float | None = None
    target_runtime: str | None = None
    min_tail_f1: float | None = None

    def __post_init__(self):
        if self.target_runtime is not None:
            runtime, precision = parse_run_name(self.target_runtime)
            if runtime not in RUNTIMES or precision not in PRECISIONS:
                raise ValueError(f"target runtime {self.target_runtime!r}: choose from {list(RUNTIMES)}, optionally "
                                 f"with -<precision> ({', '.join(PRECISIONS)}), e.g. onnxruntime-fp16")
        if self.latency_budget_ms is not None and self.latency_budget_ms <= 0:
            raise ValueError(f"latency budget must be positive, got {self.latency_budget_ms} ms")

    @property
    def target(self) -> str | None:
        """The target's evaluation / latency name (``onnxruntime`` means ONNX Runtime at its default fp32)."""
        return None if self.target_runtime is None else run_name(*parse_run_name(self.target_runtime))

    @property
    def target_label(self) -> str:
        return eval_label(self.target) if self.target else ""


def check_target(c: Constraints, pairs: list[Pair]) -> None:
    """Refuse a target runtime that no run has an evaluation or a latency (or T4 estimate) for."""
    if c.target is None:
        return
    present = sorted({*(n for p in pairs for n in p.evals), *(lat.eval_name for p in pairs for lat in p.latencies)})
    if c.target not in present:
        raise ReportError(f"target runtime {c.target_runtime!r} ({c.target_label}): no run has an evaluation "
                          f"(eval/{c.target}/) or a latency (latency/{c.target}.json) for it; present: "
                          f"{', '.join(present) or 'none'}")


def _target_latency(c: Constraints, pairs: list[Pair]) -> str:
    """Where the target runtime's latency comes from, naming only latency files that exist."""
    measured = any(lat.eval_name == c.target for p in pairs for lat in p.measured())
    estimated = any(lat.estimate and lat.eval_name == c.target for p in pairs for lat in p.latencies)
    estimate = "T4 ESTIMATES (roofline projections stored in the pairs' other latency files, not measurements)"
    if measured:
        return f"latency/{c.target}.json where measured" + (f", else {estimate}" if estimated else "")
    if estimated:
        return f"{estimate} only, as no pair has a measured {c.target_label} latency"
    return f"nowhere, as no pair has a {c.target_label} latency"


def _metric_words(metric: str | None, fallback: list[str]) -> str:
    """What the selection metric is and where it comes from, for rule step 4."""
    if metric == CROSSFIT:
        return (f"{CROSSFIT} from config.json's {SELECTION}: macro-F1 on the validation split, each thresholded tag "
                "decided by a threshold fitted on the other half of validation (2-fold cross-fitting, so the "
                "thresholds' own fit does not flatter it) and each single-valued field by arg-max")
    if metric == VAL_MAP:
        why = (f"; used because {', '.join(fallback)} record{'s' if len(fallback) == 1 else ''} no {CROSSFIT}, and "
               "every candidate is judged on the same metric" if fallback else "")
        return (f"threshold-free validation mAP: {SELECTION}.{VAL_MAP}, or where that is absent (e.g. runs "
                f"trained before {SELECTION} existed) the one training selected its checkpoint on "
                f"({OLD_VAL_MAP[0]} of a probe, {OLD_VAL_MAP[1]} of a fine-tune: the best of the settings or "
                f"epochs tried, so slightly optimistic){why}")
    return (f"{CROSSFIT} ({VAL_METRICS[CROSSFIT]}, config.json {SELECTION}) where every candidate records it, "
            f"else {VAL_MAP} (validation mAP)")


def rule_lines(c: Constraints, pairs: list[Pair], metric: str | None = None,
               fallback: list[str] | None = None) -> list[str]:
    """The rule as printed in the report, with the constraints and the validation metric used (``metric``;
    ``fallback``: the candidates without the preferred one) filled in."""
    if c.target:
        judged = (f"Each pair is judged on {c.target_label}: p99 latency at batch 1 from {_target_latency(c, pairs)}; "
                  f"test scores (reported, not used to choose) from the pair's own {c.target_label} evaluation "
                  f"(eval/{c.target}). A pair whose {c.target_label} evaluation failed, or whose exported model for it "
                  f"failed its parity check against PyTorch fp32, is excluded; one not evaluated on {c.target_label} "
                  "cannot be considered.")
    else:
        judged = ("Each pair is judged on its fastest runtime (p99 latency at batch 1, measured, not a T4 ESTIMATE) "
                  "whose own evaluation did not fail and whose exported model did not fail its parity check against "
                  "PyTorch fp32 (export/parity.json, engine sidecars); test scores (reported, not used to choose) "
                  "from that runtime's evaluation, or from PyTorch fp32's where the runtime was not evaluated (flagged "
                  "\"accuracy not measured on this runtime\"). A pair with no such latency is judged on PyTorch fp32 "
                  "without a latency.")
    where = f"on {c.target_label}" if c.target else "on the runtime each pair is judged on"
    label = f"{metric}: {VAL_METRICS[metric]}" if metric else "validation metric"
    return [
        (f"1. Candidates: complete runs with a scored PyTorch fp32 evaluation. {judged} Flagged: every export "
         "that failed parity, and every exported or reduced-precision evaluation whose macro-F1 differs from PyTorch "
         f"fp32's by more than the export tolerance ({tolerances()})."),
        "2. Constraints: " + "; ".join([
            f"p99 latency at batch 1 <= {c.latency_budget_ms:g} ms, as measured on the pair's benchmark device (named "
            "in the flags when it is not a T4); a T4 ESTIMATE never satisfies the budget, and a pair without a "
            "measured latency cannot be considered"
            if c.latency_budget_ms is not None else "no latency budget (--latency-budget-ms)",
            f"validation long-tail macro-F1 >= {c.min_tail_f1:g} ({SELECTION}.{VAL_TAIL}, cross-fitted like the "
            "selection metric; the test long-tail F1 is not used): a pair whose config.json does not record it, or "
            "where no long-tail tag has a validation positive, cannot be considered"
            if c.min_tail_f1 is not None else "no long-tail floor (--min-tail-f1)"]) + ".",
        ("3. Pairs with random-init weights are eligible only when no pretrained pair is; the recommendation then "
         "warns that it is not a valid backbone comparison."),
        (f"4. Selected on validation ({label}); test reported once, not used to choose. The choice is the "
         f"candidate with the highest {_metric_words(metric, fallback or [])}. Validation metrics are the trained "
         "model's, recorded by train; an exported model is held to them by its parity check. A pair whose config.json "
         "records no validation metric cannot be recommended: test scores never stand in. Candidates within the "
         "margin of the best on validation (1 standard error of the best pair's validation metric where config.json "
         f"records one, {SELECTION}.<metric>_se, else {VAL_MARGIN:g}) are indistinguishable on validation; among them "
         f"the lower measured p99 latency at batch 1 {where} wins (latencies within {LATENCY_TIE:.0%} of the fastest "
         "count as equal, and a pair without a measured latency comes last), then the higher validation mAP "
         f"({SELECTION}.{VAL_MAP}: threshold-free, so the noise of fitting the decision rule on few positives does not "
         "decide it) where the metric above is another and every tied pair records it, else the lower training "
         "cost: the sum of timing.json's phases, plus the linear probe's for a fine-tune that starts from the "
         "probe's head (LP-then-FT). The runner-up is the same rule applied to the rest. Test macro-F1 and long-tail "
         "F1 with their 95% CIs, and the paired bootstrap of the top two, are reported below; they never change the choice."),
    ]


def p99(lat: Latency) -> float | None:
    return lat.latency_ms("p99").value


def _unusable(pair: Pair, lat: Latency) -> bool:
    """Whether ``lat``'s runtime cannot judge ``pair``: its evaluation failed, or its export failed parity."""
    ev = pair.evaluation_for(lat)
    return (ev is not None and not ev.scored) or lat.eval_name in pair.parity_failures


def pair_flags(pair: Pair) -> list[str]:
    """The pair's own flags, whatever the rule judges it on: random init, exports that failed parity, and
    evaluations whose macro-F1 is outside the export tolerance of PyTorch fp32's."""
    out = [RANDOM_FLAG] if pair.random_init else []
    out += [f"{eval_label(name)} export FAILED its parity check (not used to judge the pair)"
            for name in pair.parity_failures]
    if pair.reference is not None:
        out += [f"{ev.label} macro-F1 differs from PyTorch fp32 by more than the ±{tol:g} export tolerance"
                for name, ev in pair.evals.items()
                if name != REFERENCE_EVAL and (tol := outside_tolerance(ev, pair.reference)) is not None]
    return out


def _finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


@dataclass(frozen=True)
class Validation:
    """A pair's validation metrics as config.json records them (PyTorch fp32, at training time)."""

    scores: dict[str, Sourced]  # metric -> its finite value, in :data:`VAL_METRICS` order
    tail: Sourced | None  # the cross-fitted long-tail F1 (value None where undefined); None without summary.selection
    se: dict[str, Sourced]  # metric -> its standard error over validation images, where recorded
    n_val: Sourced | None
    how: str | None  # summary.selection.how: the selection metric in words, as train wrote it

    def to_json(self) -> dict:
        return {"scores": {m: v.to_json() for m, v in self.scores.items()},
                "tail": None if self.tail is None else self.tail.to_json(),
                "se": {m: v.to_json() for m, v in self.se.items()},
                "n_val": None if self.n_val is None else self.n_val.to_json(), "how": self.how}


def validation(pair: Pair) -> Validation:
    """``pair``'s validation metrics: config.json's ``summary.selection``, and for runs trained before it existed
    the validation mAP training selected on (:data:`OLD_VAL_MAP`). Never a test score."""
    cfg = pair.config
    sel = cfg.get(SELECTION).value
    sel = sel if isinstance(sel, dict) else None
    scores: dict[str, Sourced] = {}
    for metric in VAL_METRICS:
        if sel is not None and _finite(sel.get(metric)) is not None:
            scores[metric] = Sourced(_finite(sel[metric]), cfg.rel, f"{SELECTION}.{metric}")
    if VAL_MAP not in scores:
        path = next((path for path in OLD_VAL_MAP if _finite(dig(cfg.doc, path)) is not None), None)
        if path is not None:
            scores[VAL_MAP] = Sourced(_finite(dig(cfg.doc, path)), cfg.rel, path)
    se = {}
    for metric in scores:
        key = next((k for k in SE_FIELDS[metric] if sel is not None and (_finite(sel.get(k)) or 0) > 0), None)
        if key is not None:
            se[metric] = Sourced(_finite(sel[key]), cfg.rel, f"{SELECTION}.{key}")
    tail = None if sel is None else Sourced(_finite(sel.get(VAL_TAIL)), cfg.rel, f"{SELECTION}.{VAL_TAIL}")
    n_val = cfg.get(f"{SELECTION}.n_val") if sel is not None and sel.get("n_val") is not None else (
        cfg.get("dataset.n_val") if dig(cfg.doc, "dataset.n_val") is not None else None)
    return Validation(scores, tail, se, n_val, sel.get("how") if sel is not None else None)


def selection_metric(cands: list[Candidate]) -> str | None:
    """The validation metric every candidate is judged on: the first of :data:`VAL_METRICS` that all of them
    record; else (never with train's layout, where summary.selection carries val_map) the one most record."""
    counts = {m: sum(m in c.validation.scores for c in cands) for m in VAL_METRICS}
    common = next((m for m in VAL_METRICS if cands and counts[m] == len(cands)), None)
    return common or (max(VAL_METRICS, key=counts.get) if any(counts.values()) else None)


@dataclass
class Candidate:
    """A pair as the rule judges it: the evaluation its accuracy comes from, its latency, its training cost."""

    pair: Pair
    evaluation: Evaluation  # where the reported test scores come from
    latency: Latency | None
    cost: Sourced | None
    validation: Validation | None = None  # what the rule chooses on (read from the pair's config.json when None)

    def __post_init__(self):
        if self.validation is None:
            self.validation = validation(self.pair)

    def val(self, metric: str) -> Sourced | None:
        return self.validation.scores.get(metric)

    @property
    def name(self) -> str:
        return self.pair.name

    def metric(self, bucket: str | None = None) -> Sourced:
        return self.evaluation.get("macro_f1" if bucket is None else f"buckets.{bucket}.macro_f1")

    def ci(self, bucket: str | None = None) -> list | None:
        return self.evaluation.get(f"ci.{BUCKET_CI[bucket]}").value

    @property
    def accuracy_measured(self) -> bool:
        """Whether the accuracy is the judged runtime's own (not PyTorch fp32 standing in for it)."""
        return self.latency is None or self.latency.eval_name == self.evaluation.name

    @property
    def flags(self) -> list[str]:
        """The pair's flags, then the judged runtime's: latency not measured on a T4, accuracy not its own."""
        out = pair_flags(self.pair)
        lat = self.latency
        if lat is not None and not lat.on_t4:
            out.append("latency is a T4 ESTIMATE (roofline projection, not measured)" if lat.estimate
                       else f"latency not measured on a T4 ({lat.device})")
        if not self.accuracy_measured:
            out.append(f"accuracy not measured on this runtime ({lat.label}: PyTorch fp32 accuracy used)")
        return out

    def describe(self, metric: str | None = None) -> str:
        """``dinov2-ft: validation ... 0.612 (used to choose); test macro-F1 0.598 [0.58, 0.61] (...), test long-tail
        F1 ..., p99 ... on ..., trained in ...``"""
        parts = []
        if metric is not None:
            v, se = self.val(metric), self.validation.se.get(metric)
            parts.append(f"{VAL_METRICS[metric]} {fmt.num(v.value if v else None)}"
                         + (f" ± {fmt.num(se.value)} (SE)" if se else "") + " (used to choose)")
            if self.validation.tail is not None and self.validation.tail.value is not None:
                parts.append(f"cross-fitted validation long-tail F1 {fmt.num(self.validation.tail.value)}")
        parts += [f"test macro-F1 {fmt.with_ci(self.metric().value, self.ci())} ({self.evaluation.label})",
                  f"test long-tail F1 {fmt.with_ci(self.metric('tail').value, self.ci('tail'))}"]
        if self.latency is not None:
            parts.append(f"p99 {fmt.ms(p99(self.latency))} ms at batch 1 on {self.latency.label}")
        else:
            parts.append("no latency measured")
        trained = f"trained in {fmt.duration(self.cost.value if self.cost else None)}"
        if self.pair.starts_from_probe:
            trained += " (fine-tune plus the linear probe it starts from)"
        return f"{self.name}: " + ", ".join([*parts, trained])


def _not_evaluated(pair: Pair, c: Constraints) -> str:
    """Why ``pair`` has no evaluation on the target runtime, down to the root cause where the artifacts show it."""
    if c.target in pair.stale:
        return f"eval/{c.target} is stale ({pair.stale[c.target]} changed since it was scored)"
    if parse_run_name(c.target)[0] == "tensorrt" and not pair.exported(c.target):
        return f"not evaluated on {c.target_label} because {NO_ENGINE}"
    return f"not evaluated on {c.target_label}"


def judge(pair: Pair, pairs: list[Pair], c: Constraints) -> Candidate | str:
    """``pair`` as the rule judges it (rule step 1), or why it cannot be judged."""
    cost = training_cost(pair, pairs)
    if c.target is None:
        usable = [lat for lat in pair.measured() if p99(lat) is not None and not _unusable(pair, lat)]
        lat = min(usable, key=p99, default=None)
        ev = pair.evaluation_for(lat) if lat is not None else None
        return Candidate(pair, ev if ev is not None else pair.reference, lat, cost)
    ev = pair.evals.get(c.target)
    if ev is None:
        return _not_evaluated(pair, c)
    pool = [lat for lat in pair.latencies if lat.eval_name == c.target and p99(lat) is not None]
    lat = min([lat for lat in pool if not lat.estimate] or pool, key=p99, default=None)
    return Candidate(pair, ev, lat, cost)


def candidates(pairs: list[Pair], c: Constraints) -> tuple[list[Candidate], list[dict], list[dict], list[Candidate]]:
    """(candidates meeting the constraints, pairs excluded by a constraint, pairs that could not be considered,
    every pair the rule could judge)."""
    kept, excluded, unknown, judged = [], [], [], []
    for pair in pairs:
        cand = judge(pair, pairs, c) if pair.reference is not None else pair.unscored_reason()
        if isinstance(cand, str):
            unknown.append({"pair": pair.name, "reason": cand})
            continue
        judged.append(cand)
        lat, ev, val = cand.latency, cand.evaluation, cand.validation
        tail = val.tail.value if val.tail is not None else None
        if not ev.scored:
            excluded.append({"pair": pair.name, "reason": f"its {ev.label} evaluation failed on the test split "
                                                          f"({ev.doc.get('reason', ev.doc.get('status'))})"})
        elif ev.name in pair.parity_failures:
            failures = "; ".join(pair.parity_failures[ev.name].value) or "failed"
            excluded.append({"pair": pair.name, "reason": f"its {ev.label} export failed its parity check "
                                                          f"({failures})"})
        elif not val.scores:
            unknown.append({"pair": pair.name, "reason": NO_VALIDATION})
        elif c.latency_budget_ms is not None and lat is None:
            where = c.target_label or "any runtime whose evaluation did not fail and whose export passed parity"
            unknown.append({"pair": pair.name, "reason": f"no latency measured on {where}"})
        elif c.latency_budget_ms is not None and lat.estimate:
            unknown.append({"pair": pair.name, "reason": f"its only {c.target_label} latency is a T4 ESTIMATE, which "
                                                         "never satisfies a latency budget"})
        elif c.latency_budget_ms is not None and p99(lat) > c.latency_budget_ms:
            excluded.append({"pair": pair.name, "reason": f"p99 {fmt.ms(p99(lat))} ms at batch 1 ({lat.label}) "
                                                          f"exceeds the {c.latency_budget_ms:g} ms budget"})
        elif c.min_tail_f1 is not None and val.tail is None:
            unknown.append({"pair": pair.name, "reason": f"no validation long-tail F1 in config.json (it predates "
                                                         f"{SELECTION}), so --min-tail-f1 cannot be checked; the test "
                                                         "long-tail F1 does not stand in"})
        elif c.min_tail_f1 is not None and tail is None:
            unknown.append({"pair": pair.name, "reason": "validation long-tail F1 undefined (no long-tail tag has a "
                                                         "validation positive), so --min-tail-f1 cannot be checked"})
        elif c.min_tail_f1 is not None and tail < c.min_tail_f1:
            excluded.append({"pair": pair.name, "reason": f"cross-fitted validation long-tail F1 {fmt.num(tail)} is "
                                                          f"below the {c.min_tail_f1:g} floor"})
        else:
            kept.append(cand)
    if any(not cand.pair.random_init for cand in kept):
        excluded += [{"pair": cand.name, "reason": "random-init weights, and pretrained pairs are eligible"}
                     for cand in kept if cand.pair.random_init]
        kept = [cand for cand in kept if not cand.pair.random_init]
    return kept, excluded, unknown, judged


def _seconds(c: Candidate) -> float:
    return math.inf if c.cost is None or c.cost.value is None else c.cost.value


def _measured_ms(c: Candidate) -> float:
    """The candidate's measured p99 latency at batch 1 (inf without one; a T4 ESTIMATE is not a measurement)."""
    if c.latency is None or c.latency.estimate:
        return math.inf
    v = p99(c.latency)
    return math.inf if v is None else v


def margin(best: Candidate, metric: str) -> tuple[float, str]:
    """How far below ``best`` on validation a candidate is indistinguishable from it, and that margin in words."""
    se = best.validation.se.get(metric)
    if se is not None:
        return se.value, f"{fmt.num(se.value)} (1 standard error of {best.name}'s {metric}, {se.field})"
    return VAL_MARGIN, f"{VAL_MARGIN:g} (fixed: config.json records no standard error)"


def choose(cands: list[Candidate], metric: str) -> tuple[Candidate, str]:
    """The rule's pick among ``cands`` (non-empty, each recording ``metric``) and why, in words. Validation only:
    the highest ``metric``, then among those within the margin of it, latency, then validation mAP (else training
    cost)."""
    def val(c: Candidate) -> float:
        return c.val(metric).value

    best = max(cands, key=val)  # the first of equal maxima
    if len(cands) == 1:
        return best, "the only candidate"
    gap, gap_words = margin(best, metric)
    tied = [best] + [c for c in cands if c is not best and val(best) - val(c) <= gap + 1e-12]
    if len(tied) == 1:
        nxt = max((c for c in cands if c is not best), key=val)
        return best, (f"highest {VAL_METRICS[metric]} ({fmt.num(val(best))}), more than the margin of {gap_words} "
                      f"above every other candidate (next: {nxt.name}, {fmt.num(val(nxt))})")
    within = (f"{VAL_METRICS[metric]} indistinguishable between "
              + ", ".join(f"{c.name} ({fmt.num(val(c))})" for c in tied) + f": within the margin of {gap_words}")

    def latency_words(cs: list[Candidate]) -> str:
        return ", ".join(f"{c.name} {fmt.ms(_measured_ms(c))} ms on {c.latency.label}" if math.isfinite(_measured_ms(c))
                         else f"{c.name} not measured" for c in cs)

    fastest = min(tied, key=_measured_ms)
    if not math.isfinite(_measured_ms(fastest)):
        pick, why = _best_ranker(tied, metric)
        return pick, f"{within}; none has a measured latency, and {why}"
    fast = [c for c in tied if _measured_ms(c) <= _measured_ms(fastest) * (1 + LATENCY_TIE)]
    if len(fast) == 1:
        return fastest, (f"{within}; {fastest.name} has the lowest measured p99 latency at batch 1 "
                         f"({latency_words(tied)})")
    pick, why = _best_ranker(fast, metric)
    return pick, (f"{within}; the measured p99 latencies at batch 1 of {', '.join(c.name for c in fast)} are within "
                  f"{LATENCY_TIE:.0%} of each other ({latency_words(fast)}), and {why}")


def _best_ranker(tied: list[Candidate], metric: str) -> tuple[Candidate, str]:
    """Among candidates tied on ``metric`` and on latency: the highest validation mAP (threshold-free: how well the
    model ranks, which the decision rule's fit does not move), where ``metric`` is another and every one records
    it; else the lowest training cost."""
    if metric != VAL_MAP and all(c.val(VAL_MAP) is not None for c in tied):
        pick = max(tied, key=lambda c: c.val(VAL_MAP).value)
        return pick, (f"{pick.name} has the highest {VAL_METRICS[VAL_MAP]} ("
                      + ", ".join(f"{c.name} {fmt.num(c.val(VAL_MAP).value)}" for c in tied) + ")")
    pick = min(tied, key=_seconds)
    return pick, (f"{pick.name} has the lowest training cost "
                  f"({fmt.duration(_seconds(pick) if math.isfinite(_seconds(pick)) else None)})")


TEST_ONLY = "Test split (reported once, not used to choose): "


def _difference_text(res: dict | None, tail: dict | None, a: Candidate, b: Candidate,
                     comparer: Comparer) -> tuple[str, bool]:
    """A sentence on chosen vs runner-up test macro-F1 (and long-tail F1), and whether the test data separate them
    on macro-F1. Reported only: the choice was made on validation."""
    if res is None:
        ca, cb = a.ci(), b.ci()
        overlap = not (ca and cb and None not in (*ca, *cb) and (ca[0] > cb[1] or cb[0] > ca[1]))
        why = comparer.unavailable or "no paired comparison possible"
        text = (f"{TEST_ONLY}no paired bootstrap ({why}); the top two's own 95% CIs of test macro-F1 "
                + ("overlap: **the test data cannot separate the top two**." if overlap else "do not overlap"))
        if not overlap:
            text += (", and the runner-up's is the higher: **test disagrees with validation**; the choice follows "
                     "validation." if _higher(b, a) else ".")
        return text, not overlap
    text = (f"{TEST_ONLY}{a.name} − {b.name} macro-F1 {fmt.signed_ci(res['observed_diff'], res['ci'])} "
            f"(paired bootstrap, {res['n_resamples']} resamples), P({a.name} better) = {res['p_a_better']:.2f}: ")
    if not res["separated"]:
        text += "**the test data cannot separate the top two** (the CI of the difference contains 0)."
    elif res["observed_diff"] > 0:
        text += "test agrees with validation, outside noise."
    else:
        text += (f"**test disagrees with validation**: {b.name} is better on the test split, outside noise; the "
                 "choice follows validation, as the rule fixes it before the test split is read.")
    if tail is not None:
        text += (f" Long-tail F1: {fmt.signed_ci(tail['observed_diff'], tail['ci'])}, P({a.name} better) = "
                 f"{tail['p_a_better']:.2f}" + (" (separated)." if tail["separated"] else " (the CI contains 0)."))
    return text, res["separated"]


def _higher(a: Candidate, b: Candidate) -> bool:
    va, vb = a.metric().value, b.metric().value
    return va is not None and vb is not None and va > vb


def flag_lines(pairs: list[Pair], judged: list[Candidate]) -> tuple[dict[str, list[str]], list[str]]:
    """Every pair's flags (:func:`pair_flags`, and for a pair the rule judged: latency not measured on a T4,
    accuracy not measured on the judged runtime), and one line per kind of flag naming the pairs it applies to."""
    by_pair = {p.name: pair_flags(p) for p in pairs} | {c.name: c.flags for c in judged}
    by_flag: dict[str, list[str]] = {}
    for name, flags in by_pair.items():
        for flag in flags:
            by_flag.setdefault(flag, []).append(name)
    return ({name: flags for name, flags in by_pair.items() if flags},
            [f"Flag — {flag}: {', '.join(names)}." for flag, names in by_flag.items()])


def recommend(pairs: list[Pair], constraints: Constraints, comparer: Comparer) -> dict:
    """Apply the rule; the result holds the printed rule, the choice, the runner-up, why, every flag, and each
    pair's validation metric beside its test scores (``validation``)."""
    check_target(constraints, pairs)
    cands, excluded, unknown, judged = candidates(pairs, constraints)
    metric = selection_metric(cands)
    for cand in [c for c in cands if metric not in c.validation.scores]:  # never with train's own layout
        unknown.append({"pair": cand.name, "reason": f"its validation metric ({', '.join(cand.validation.scores)}) "
                                                     f"is not the one the other candidates are compared on ({metric})"})
    cands = [c for c in cands if metric in c.validation.scores]
    fallback = [c.name for c in cands if CROSSFIT not in c.validation.scores] if metric == VAL_MAP else []
    flags, flagged = flag_lines(pairs, judged)
    log: list[dict] = []
    result = {"rule": rule_lines(constraints, pairs, metric, fallback), "constraints": asdict(constraints),
              "selected_on": "validation", "selection_metric": metric,
              "selection_metric_label": VAL_METRICS.get(metric), "fallback_to_val_map": fallback,
              "margin": None, "considered": [c.name for c in cands], "excluded": excluded, "not_considered": unknown,
              "chosen": None, "runner_up": None, "why": None, "runner_up_why": None, "separable": None,
              "top_two": None, "top_two_tail": None, "comparisons": log, "flags": flags,
              "paired_bootstrap": comparer.available,
              "all_random_init": bool(cands) and all(c.pair.random_init for c in cands)}
    result["validation"] = validation_rows(pairs, judged, result)
    if not cands:
        reasons = {u["reason"] for u in unknown}
        verdict = ("no pair meets the constraints." if excluded
                   else f"no pair could be considered: for every pair, {reasons.pop()}." if len(reasons) == 1
                   else "no pair could be considered.")
        return result | {"text": [f"**No pair can be recommended**: {verdict}", *flagged,
                                  *_gap_lines(excluded, unknown)]}
    chosen, why = choose(cands, metric)
    rest = [c for c in cands if c is not chosen]
    runner, runner_why = choose(rest, metric) if rest else (None, None)
    runner_why = runner_why and f"among the rest: {runner_why}"
    gap, gap_words = margin(max(cands, key=lambda c: c.val(metric).value), metric)
    lines = [f"**Recommended: {chosen.name}** — {chosen.describe(metric).split(': ', 1)[1]}.",
             f"Why (validation only): {why}."]
    if fallback:
        lines.append(f"Judged on validation mAP, not the cross-fitted validation macro-F1, because "
                     f"{', '.join(fallback)} record{'s' if len(fallback) == 1 else ''} no {CROSSFIT} in config.json's "
                     f"{SELECTION} (trained before it existed): every candidate is compared on the same metric.")
    if result["all_random_init"]:
        lines.append("**Warning: every eligible pair uses random-init weights, so this is not a valid backbone "
                     "comparison** (e.g. the offline synthetic demo): the recommendation only shows the pipeline "
                     "working.")
    result |= {"chosen": chosen.name, "why": why, "chosen_eval": chosen.evaluation.rel,
               "chosen_latency": chosen.latency.rel if chosen.latency else None,
               "chosen_validation": chosen.val(metric).to_json(), "margin": {"value": gap, "words": gap_words}}
    if runner is not None:
        res = comparer.compare(chosen.evaluation, runner.evaluation)
        tail = comparer.compare(chosen.evaluation, runner.evaluation, "tail") if res is not None else None
        log += [r for r in (res, tail) if r is not None]
        diff_text, separable = _difference_text(res, tail, chosen, runner, comparer)
        lines += [f"Runner-up: {runner.describe(metric)} ({runner_why}).", diff_text]
        result |= {"runner_up": runner.name, "runner_up_why": runner_why, "separable": separable, "top_two": res,
                   "top_two_tail": tail}
    else:
        lines.append("Runner-up: none (only one pair meets the constraints).")
    for row in result["validation"]:
        row["outcome"] = ("recommended" if row["pair"] == chosen.name else
                          "runner-up" if runner is not None and row["pair"] == runner.name else row["outcome"])
    result["text"] = lines + flagged + _gap_lines(excluded, unknown)
    return result


def validation_rows(pairs: list[Pair], judged: list[Candidate], result: dict) -> list[dict]:
    """Every pair's validation metrics (what the rule chooses on) beside its test scores (reported only) and what
    the rule did with it; best on the selection metric first."""
    by_name = {c.name: c for c in judged}
    why = {e["pair"]: ("excluded", e["reason"]) for e in result["excluded"]}
    why |= {u["pair"]: ("not considered", u["reason"]) for u in result["not_considered"]}
    metric = result["selection_metric"]
    rows = []
    for pair in pairs:
        cand = by_name.get(pair.name)
        val = cand.validation if cand is not None else validation(pair)
        outcome, reason = why.get(pair.name, ("candidate", None))
        if cand is None and pair.name not in why:
            outcome, reason = "not considered", pair.unscored_reason()
        row = {"pair": pair.name, "random_init": pair.random_init, "outcome": outcome, "reason": reason,
               "validation": val.to_json(), "selection_value": None, "test": None, "latency": None, "cost": None}
        chosen_on = val.scores.get(metric) if metric else next(iter(val.scores.values()), None)
        row["selection_value"] = None if chosen_on is None else chosen_on.to_json()
        if cand is not None:
            ev = cand.evaluation
            row["test"] = {"evaluation": ev.label, "macro_f1": cand.metric().to_json(), "ci": cand.ci(),
                           "tail_f1": cand.metric("tail").to_json(), "tail_ci": cand.ci("tail")} if ev.scored else None
            if cand.latency is not None:
                row["latency"] = {"label": cand.latency.label, "estimate": cand.latency.estimate,
                                  "p99_ms_batch1": cand.latency.latency_ms("p99").to_json()}
            row["cost"] = None if cand.cost is None else cand.cost.to_json()
        rows.append(row)
    def best_first(row: dict) -> tuple:
        v = (row["selection_value"] or {}).get("value")
        return v is None, -(v or 0.0)

    return sorted(rows, key=best_first)


def _gap_lines(excluded: list[dict], unknown: list[dict]) -> list[str]:
    """The pairs the rule excluded and those it could not consider, pairs with the same reason together."""
    lines = []
    for title, items in (("Excluded", excluded), ("Could not consider", unknown)):
        by_reason: dict[str, list[str]] = {}
        for e in items:
            by_reason.setdefault(e["reason"], []).append(e["pair"])
        if by_reason:
            lines.append(f"{title}: " + "; ".join(f"{', '.join(names)} ({reason})"
                                                  for reason, names in by_reason.items()) + ".")
    return lines
