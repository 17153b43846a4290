"""The decision rule: which (backbone, strategy) pair to deploy, under constraints the user sets.

:func:`rule_lines` states the rule as the report prints it; :func:`recommend` applies it. Statistical ties
come from paired bootstraps on the test split (:mod:`reports.paired`); without the test labels the rule falls
back to overlapping 95% CIs, and says so.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from reports import fmt
from reports.artifacts import (
    NO_ENGINE,
    PRECISIONS,
    REFERENCE_EVAL,
    RUNTIMES,
    Evaluation,
    Latency,
    Pair,
    ReportError,
    Sourced,
    eval_label,
    outside_tolerance,
    parse_run_name,
    run_name,
    tolerances,
    training_cost,
)
from reports.paired import Comparer

BUCKET_CI = {None: "macro_f1", "tail": "tail_macro_f1"}
RANDOM_FLAG = "random init — not a valid comparison"


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


def rule_lines(c: Constraints, pairs: list[Pair]) -> list[str]:
    """The rule as printed in the report, with the constraints filled in."""
    if c.target:
        judged = (f"Each pair is judged on {c.target_label}: p99 latency at batch 1 from {_target_latency(c, pairs)}; "
                  f"accuracy = test macro-F1 of the pair's own {c.target_label} evaluation (eval/{c.target}). "
                  f"A pair whose {c.target_label} evaluation failed, or whose exported model for it failed its parity "
                  f"check against PyTorch fp32, is excluded; one not evaluated on {c.target_label} cannot be "
                  "considered.")
    else:
        judged = ("Each pair is judged on its fastest runtime (p99 latency at batch 1, measured, not a T4 ESTIMATE) "
                  "whose own evaluation did not fail and whose exported model did not fail its parity check against "
                  "PyTorch fp32 (export/parity.json, engine sidecars); accuracy = test macro-F1 of that runtime's "
                  "evaluation, or of PyTorch fp32 where the runtime was not evaluated (flagged \"accuracy not measured "
                  "on this runtime\"). A pair with no such latency is judged on PyTorch fp32 without a latency.")
    return [
        (f"1. Candidates: complete runs with a scored PyTorch fp32 evaluation. {judged} Flagged: every export "
         "that failed parity, and every exported or reduced-precision evaluation whose macro-F1 differs from PyTorch "
         f"fp32's by more than the export tolerance ({tolerances()})."),
        "2. Constraints: " + "; ".join([
            f"p99 latency at batch 1 <= {c.latency_budget_ms:g} ms, as measured on the pair's benchmark device (named "
            "in the flags when it is not a T4); a T4 ESTIMATE never satisfies the budget, and a pair without a "
            "measured latency cannot be considered"
            if c.latency_budget_ms is not None else "no latency budget (--latency-budget-ms)",
            f"long-tail macro-F1 >= {c.min_tail_f1:g}, of the evaluation the pair is judged on"
            if c.min_tail_f1 is not None else "no long-tail floor (--min-tail-f1)"]) + ".",
        ("3. Pairs with random-init weights are eligible only when no pretrained pair is; the recommendation then "
         "warns that it is not a valid backbone comparison."),
        ("4. Maximise macro-F1. Pairs whose paired-bootstrap 95% CI of the macro-F1 difference from the best "
         "contains 0 tie with it; ties are broken by long-tail macro-F1 (tied again when that difference's CI "
         "contains 0), then by the lower training cost: the sum of timing.json's phases, plus the linear probe's "
         "for a fine-tune that starts from the probe's head (LP-then-FT). The runner-up is the same rule applied to "
         "the rest."),
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


@dataclass
class Candidate:
    """A pair as the rule judges it: the evaluation its accuracy comes from, its latency, its training cost."""

    pair: Pair
    evaluation: Evaluation
    latency: Latency | None
    cost: Sourced | None

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

    def describe(self) -> str:
        """``dinov2-ft: macro-F1 0.612 [0.60, 0.62] (...), long-tail F1 ..., p99 ... on ..., trained in ...``"""
        parts = [f"macro-F1 {fmt.with_ci(self.metric().value, self.ci())} ({self.evaluation.label})",
                 f"long-tail F1 {fmt.with_ci(self.metric('tail').value, self.ci('tail'))}"]
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
        lat, ev, tail = cand.latency, cand.evaluation, cand.metric("tail").value
        if not ev.scored:
            excluded.append({"pair": pair.name, "reason": f"its {ev.label} evaluation failed on the test split "
                                                          f"({ev.doc.get('reason', ev.doc.get('status'))})"})
        elif ev.name in pair.parity_failures:
            failures = "; ".join(pair.parity_failures[ev.name].value) or "failed"
            excluded.append({"pair": pair.name, "reason": f"its {ev.label} export failed its parity check "
                                                          f"({failures})"})
        elif c.latency_budget_ms is not None and lat is None:
            where = c.target_label or "any runtime whose evaluation did not fail and whose export passed parity"
            unknown.append({"pair": pair.name, "reason": f"no latency measured on {where}"})
        elif c.latency_budget_ms is not None and lat.estimate:
            unknown.append({"pair": pair.name, "reason": f"its only {c.target_label} latency is a T4 ESTIMATE, which "
                                                         "never satisfies a latency budget"})
        elif c.latency_budget_ms is not None and p99(lat) > c.latency_budget_ms:
            excluded.append({"pair": pair.name, "reason": f"p99 {fmt.ms(p99(lat))} ms at batch 1 ({lat.label}) "
                                                          f"exceeds the {c.latency_budget_ms:g} ms budget"})
        elif c.min_tail_f1 is not None and tail is None:
            unknown.append({"pair": pair.name, "reason": "long-tail F1 undefined (no tail tag in the test split)"})
        elif c.min_tail_f1 is not None and tail < c.min_tail_f1:
            excluded.append({"pair": pair.name, "reason": f"long-tail F1 {fmt.num(tail)} on {ev.label} is below the "
                                                          f"{c.min_tail_f1:g} floor"})
        else:
            kept.append(cand)
    if any(not cand.pair.random_init for cand in kept):
        excluded += [{"pair": cand.name, "reason": "random-init weights, and pretrained pairs are eligible"}
                     for cand in kept if cand.pair.random_init]
        kept = [cand for cand in kept if not cand.pair.random_init]
    return kept, excluded, unknown, judged


def _separated(a: Candidate, b: Candidate, bucket: str | None, comparer: Comparer, log: list[dict]) -> bool:
    """Whether ``a`` and ``b`` differ on (bucket) macro-F1: paired bootstrap, else non-overlapping 95% CIs."""
    res = comparer.compare(a.evaluation, b.evaluation, bucket)
    if res is not None:
        log.append(res)
        return res["separated"]
    ca, cb = a.ci(bucket), b.ci(bucket)
    if not ca or not cb or None in (*ca, *cb):
        return False
    return ca[0] > cb[1] or cb[0] > ca[1]


def _value(c: Candidate, bucket: str | None = None) -> float:
    v = c.metric(bucket).value
    return -math.inf if v is None else v


def _seconds(c: Candidate) -> float:
    return math.inf if c.cost is None or c.cost.value is None else c.cost.value


def choose(cands: list[Candidate], comparer: Comparer, log: list[dict]) -> tuple[Candidate, str]:
    """The rule's pick among ``cands`` (non-empty) and why, in words; comparisons made are appended to ``log``."""
    best = max(cands, key=_value)
    if len(cands) == 1:
        return best, "the only candidate"
    tied = [best] + [c for c in cands if c is not best and not _separated(best, c, None, comparer, log)]
    if len(tied) == 1:
        others = "every other candidate" if len(cands) > 2 else next(c.name for c in cands if c is not best)
        return best, f"highest macro-F1, and the difference from {others} is outside its 95% CI"
    names = ", ".join(c.name for c in tied[1:])
    by_tail = max(tied, key=lambda c: _value(c, "tail"))
    tied_tail = [by_tail] + [c for c in tied if c is not by_tail and not _separated(by_tail, c, "tail", comparer, log)]
    if len(tied_tail) == 1:
        return by_tail, (f"macro-F1 tied between {best.name} and {names} (difference CIs contain 0); "
                         f"{by_tail.name} has the best long-tail F1, separated from the others")
    pick = min(tied_tail, key=_seconds)
    return pick, (f"macro-F1 tied between {best.name} and {names}, and long-tail F1 tied between "
                  f"{', '.join(c.name for c in tied_tail)}; {pick.name} has the lowest training cost "
                  f"({fmt.duration(_seconds(pick) if math.isfinite(_seconds(pick)) else None)})")


def _difference_text(res: dict | None, a: Candidate, b: Candidate, comparer: Comparer) -> tuple[str, bool]:
    """A sentence on chosen vs runner-up macro-F1, and whether the data separate them."""
    if res is None:
        ca, cb = a.ci(), b.ci()
        overlap = not (ca and cb and None not in (*ca, *cb) and (ca[0] > cb[1] or cb[0] > ca[1]))
        why = comparer.unavailable or "no paired comparison possible"
        return ((f"No paired bootstrap ({why}); judged by their own 95% CIs, which "
                 + ("overlap: **the data cannot separate the top two**." if overlap else "do not overlap.")),
                not overlap)
    text = (f"{a.name} − {b.name} macro-F1 {fmt.signed_ci(res['observed_diff'], res['ci'])} "
            f"(paired bootstrap, {res['n_resamples']} resamples), P({a.name} better) = {res['p_a_better']:.2f}: ")
    if res["separated"]:
        return text + "the difference is outside noise.", True
    return text + ("**the data cannot separate the top two** (the CI of the difference contains 0); the choice "
                   "between them rests on the tie-breakers."), False


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
    """Apply the rule; the result holds the printed rule, the choice, the runner-up, why, and every flag."""
    check_target(constraints, pairs)
    cands, excluded, unknown, judged = candidates(pairs, constraints)
    flags, flagged = flag_lines(pairs, judged)
    log: list[dict] = []
    result = {"rule": rule_lines(constraints, pairs), "constraints": asdict(constraints),
              "considered": [c.name for c in cands], "excluded": excluded, "not_considered": unknown,
              "chosen": None, "runner_up": None, "why": None, "runner_up_why": None, "separable": None,
              "top_two": None, "comparisons": log, "flags": flags, "paired_bootstrap": comparer.available,
              "all_random_init": bool(cands) and all(c.pair.random_init for c in cands)}
    if not cands:
        reasons = {u["reason"] for u in unknown}
        verdict = ("no pair meets the constraints." if excluded
                   else f"no pair could be considered: for every pair, {reasons.pop()}." if len(reasons) == 1
                   else "no pair could be considered.")
        return result | {"text": [f"**No pair can be recommended**: {verdict}", *flagged,
                                  *_gap_lines(excluded, unknown)]}
    chosen, why = choose(cands, comparer, log)
    rest = [c for c in cands if c is not chosen]
    runner, runner_why = choose(rest, comparer, log) if rest else (None, None)
    runner_why = runner_why and f"among the rest: {runner_why}"
    lines = [f"**Recommended: {chosen.name}** — {chosen.describe().split(': ', 1)[1]}.", f"Why: {why}."]
    if result["all_random_init"]:
        lines.append("**Warning: every eligible pair uses random-init weights, so this is not a valid backbone "
                     "comparison** (e.g. the offline synthetic demo): the recommendation only shows the pipeline "
                     "working.")
    result |= {"chosen": chosen.name, "why": why, "chosen_eval": chosen.evaluation.rel,
               "chosen_latency": chosen.latency.rel if chosen.latency else None}
    if runner is not None:
        res = comparer.compare(chosen.evaluation, runner.evaluation)
        diff_text, separable = _difference_text(res, chosen, runner, comparer)
        lines += [f"Runner-up: {runner.describe()} ({runner_why}).", diff_text]
        result |= {"runner_up": runner.name, "runner_up_why": runner_why, "separable": separable, "top_two": res}
    else:
        lines.append("Runner-up: none (only one pair meets the constraints).")
    result["text"] = lines + flagged + _gap_lines(excluded, unknown)
    return result


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
