"""The decision rule: which (backbone, strategy) pair to deploy, under constraints the user sets.

:func:`rule_lines` states the rule as the report prints it; :func:`recommend` applies it. Statistical ties
come from paired bootstraps on the test split (:mod:`reports.paired`); without the test labels the rule falls
back to overlapping 95% CIs, and says so.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from reports import fmt
from reports.artifacts import RUNTIMES, Evaluation, Latency, Pair, Sourced, runtime_label
from reports.paired import Comparer

BUCKET_CI = {None: "macro_f1", "tail": "tail_macro_f1"}


@dataclass(frozen=True)
class Constraints:
    latency_budget_ms: float | None = None
    target_runtime: str | None = None
    min_tail_f1: float | None = None

    def __post_init__(self):
        if self.target_runtime is not None and self.target_runtime.split("-")[0] not in RUNTIMES:
            raise ValueError(f"target runtime {self.target_runtime!r}: choose from {list(RUNTIMES)} "
                             "or <runtime>-<precision> (e.g. onnxruntime-fp16)")
        if self.latency_budget_ms is not None and self.latency_budget_ms <= 0:
            raise ValueError(f"latency budget must be positive, got {self.latency_budget_ms} ms")


def rule_lines(c: Constraints) -> list[str]:
    """The rule as printed in the report, with the constraints filled in."""
    where = (f"on {c.target_runtime} (measured before a T4 ESTIMATE)" if c.target_runtime
             else "on the pair's fastest measured runtime")
    accuracy = (f"{c.target_runtime}'s own evaluation where it was scored, else PyTorch fp32" if c.target_runtime
                else "PyTorch fp32")
    return [
        f"1. Candidates: complete runs with a scored PyTorch fp32 evaluation. Latency = p99 at batch 1 {where}; "
        f"accuracy = test macro-F1 of {accuracy}.",
        "2. Constraints: " + "; ".join([*(["the target runtime's own evaluation must not have failed"]
                                           if c.target_runtime else []),
            f"p99 latency at batch 1 <= {c.latency_budget_ms:g} ms (a pair without that latency cannot be considered)"
            if c.latency_budget_ms is not None else "no latency budget (--latency-budget-ms)",
            f"long-tail macro-F1 >= {c.min_tail_f1:g}" if c.min_tail_f1 is not None
            else "no long-tail floor (--min-tail-f1)"]) + ".",
        "3. Maximise macro-F1. Pairs whose paired-bootstrap 95% CI of the macro-F1 difference from the best "
        "contains 0 tie with it; ties are broken by long-tail macro-F1 (tied again when that difference's CI "
        "contains 0), then by the lower total training time. The runner-up is the same rule applied to the rest.",
    ]


def p99(lat: Latency) -> float | None:
    return lat.latency_ms("p99").value


def pick_latency(pair: Pair, target: str | None) -> Latency | None:
    """The latency the rule uses for ``pair`` (see the module docstring); None when there is none."""
    if target is None:
        pool = pair.measured()
    elif "-" in target:
        pool = [lat for lat in pair.latencies if target in (lat.name, f"{lat.runtime}-{lat.precision}")]
    else:
        pool = [lat for lat in pair.latencies if lat.runtime == target]
    pool = [lat for lat in pool if p99(lat) is not None]
    pool = [lat for lat in pool if not lat.estimate] or pool
    return min(pool, key=p99, default=None)


@dataclass
class Candidate:
    pair: Pair
    evaluation: Evaluation
    latency: Latency | None

    @property
    def name(self) -> str:
        return self.pair.name

    def metric(self, bucket: str | None = None) -> Sourced:
        return self.evaluation.get("macro_f1" if bucket is None else f"buckets.{bucket}.macro_f1")

    def ci(self, bucket: str | None = None) -> list | None:
        return self.evaluation.get(f"ci.{BUCKET_CI[bucket]}").value

    @property
    def train_seconds(self) -> Sourced | None:
        return self.pair.timing.get("seconds.total") if self.pair.timing else None

    @property
    def flags(self) -> list[str]:
        out = ["random init — not a valid comparison"] if self.pair.random_init else []
        if self.latency is not None and not self.latency.on_t4:
            out.append("latency is a T4 ESTIMATE (roofline projection, not measured)" if self.latency.estimate
                       else f"latency not measured on a T4 ({self.latency.device})")
        return out

    def describe(self) -> str:
        """``dinov2-ft: macro-F1 0.612 [0.60, 0.62], long-tail F1 ..., p99 ... on ..., trained in ...``"""
        parts = [f"macro-F1 {fmt.with_ci(self.metric().value, self.ci())} ({self.evaluation.label})",
                 f"long-tail F1 {fmt.with_ci(self.metric('tail').value, self.ci('tail'))}"]
        if self.latency is not None:
            lat = self.latency
            where = "a T4 (ESTIMATE, TensorRT fp16)" if lat.estimate else runtime_label(lat.runtime, lat.precision)
            parts.append(f"p99 {fmt.ms(p99(lat))} ms at batch 1 on {where}")
        else:
            parts.append("no latency measured")
        seconds = self.train_seconds
        parts.append(f"trained in {fmt.duration(seconds.value if seconds else None)}")
        return f"{self.name}: " + ", ".join(parts)


def candidates(pairs: list[Pair], c: Constraints) -> tuple[list[Candidate], list[dict], list[dict]]:
    """(candidates meeting the constraints, pairs excluded by a constraint, pairs that could not be considered)."""
    kept, excluded, unknown = [], [], []
    for pair in pairs:
        if pair.reference is None:
            unknown.append({"pair": pair.name, "reason": pair.unscored_reason()})
            continue
        lat = pick_latency(pair, c.target_runtime)
        ev = pair.evals.get(lat.name) if c.target_runtime and lat is not None and not lat.estimate else None
        cand = Candidate(pair, ev if ev is not None and ev.scored else pair.reference, lat)
        tail = cand.metric("tail").value
        if ev is not None and not ev.scored:
            excluded.append({"pair": pair.name, "reason": f"its {ev.label} evaluation failed on the test split "
                                                          f"({ev.doc.get('reason', ev.doc.get('status'))})"})
        elif c.latency_budget_ms is not None and lat is None:
            unknown.append({"pair": pair.name, "reason": f"no latency measured on {c.target_runtime or 'any runtime'}"})
        elif c.latency_budget_ms is not None and p99(lat) > c.latency_budget_ms:
            excluded.append({"pair": pair.name, "reason": f"p99 {fmt.ms(p99(lat))} ms at batch 1 "
                                                          f"({lat.runtime} {lat.precision}) exceeds the "
                                                          f"{c.latency_budget_ms:g} ms budget"})
        elif c.min_tail_f1 is not None and tail is None:
            unknown.append({"pair": pair.name, "reason": "long-tail F1 undefined (no tail tag in the test split)"})
        elif c.min_tail_f1 is not None and tail < c.min_tail_f1:
            excluded.append({"pair": pair.name, "reason": f"long-tail F1 {fmt.num(tail)} is below the "
                                                          f"{c.min_tail_f1:g} floor"})
        else:
            kept.append(cand)
    return kept, excluded, unknown


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
    s = c.train_seconds
    return math.inf if s is None or s.value is None else s.value


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
                  f"{', '.join(c.name for c in tied_tail)}; {pick.name} trains fastest "
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


def recommend(pairs: list[Pair], constraints: Constraints, comparer: Comparer) -> dict:
    """Apply the rule; the result holds the printed rule, the choice, the runner-up, why, and every flag."""
    cands, excluded, unknown = candidates(pairs, constraints)
    log: list[dict] = []
    result = {"rule": rule_lines(constraints), "constraints": asdict(constraints),
              "considered": [c.name for c in cands], "excluded": excluded, "not_considered": unknown,
              "chosen": None, "runner_up": None, "why": None, "runner_up_why": None, "separable": None,
              "top_two": None, "comparisons": log, "flags": {}, "paired_bootstrap": comparer.available}
    if not cands:
        verdict = "no pair meets the constraints." if excluded else "no pair could be considered."
        return result | {"text": [f"**No pair can be recommended**: {verdict}", *_gap_lines(excluded, unknown)]}
    chosen, why = choose(cands, comparer, log)
    rest = [c for c in cands if c is not chosen]
    runner, runner_why = choose(rest, comparer, log) if rest else (None, None)
    runner_why = runner_why and f"among the rest: {runner_why}"
    lines = [f"**Recommended: {chosen.name}** — {chosen.describe().split(': ', 1)[1]}.", f"Why: {why}."]
    result |= {"chosen": chosen.name, "why": why, "chosen_eval": chosen.evaluation.rel,
               "chosen_latency": chosen.latency.rel if chosen.latency else None}
    if runner is not None:
        res = comparer.compare(chosen.evaluation, runner.evaluation)
        diff_text, separable = _difference_text(res, chosen, runner, comparer)
        lines += [f"Runner-up: {runner.describe()} ({runner_why}).", diff_text]
        result |= {"runner_up": runner.name, "runner_up_why": runner_why, "separable": separable, "top_two": res}
    else:
        lines.append("Runner-up: none (only one pair meets the constraints).")
    for c in cands:
        if c.flags:
            result["flags"][c.name] = c.flags
    flagged = [c for c in (chosen, runner) if c is not None and c.flags]
    lines += [f"Flag — {c.name}: {'; '.join(c.flags)}." for c in flagged]
    if any(c.pair.random_init for c in cands):
        lines.append("Runs with random-init weights (" + ", ".join(c.name for c in cands if c.pair.random_init)
                     + ") are not a valid comparison: their ranking says nothing about the pretrained backbones.")
    result["text"] = lines + _gap_lines(excluded, unknown)
    return result


def _gap_lines(excluded: list[dict], unknown: list[dict]) -> list[str]:
    """The pairs the constraints excluded and those that could not be considered, with the reasons."""
    return [f"{title}: " + "; ".join(f"{e['pair']} ({e['reason']})" for e in items) + "."
            for title, items in (("Excluded by the constraints", excluded), ("Could not consider", unknown)) if items]
