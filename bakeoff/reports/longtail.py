"""The long-tail section: how the backbones differ on rare tags, and whether fine-tuning helps the tail.

All on the PyTorch fp32 evaluations: tail macro-F1 of each pair, paired bootstraps between backbones (per
strategy) and between strategies (per backbone) on the tail tags, macro-F1 and tail macro-F1 field by field
(catalogs whose tags are ``field=value``: where the F1 is lost), and the rare tags where the pairs disagree
most (per_tag.csv, matched by tag name). Random-init pairs are marked wherever they appear, and left out of
the disagreement spread when at least two pretrained backbones can be compared.
"""
from __future__ import annotations

from itertools import combinations

from bakeoff.reports import fmt
from bakeoff.reports.artifacts import FAMILY_LABELS, PER_TAG, RANDOM_INIT, STRATEGY_LABELS, Pair, ReportError
from bakeoff.reports.document import Block, Bullets, Para, Table
from bakeoff.reports.paired import Comparer

TAIL = "tail"
N_DISAGREE = 10
INCONCLUSIVE = "inconclusive: the 95% CI includes 0"


def _verdict(res: dict, better: str, worse: str) -> str:
    return (f"{better} better" if res["observed_diff"] > 0 else f"{worse} better") if res["separated"] \
        else INCONCLUSIVE


def analyse(pairs: list[Pair], comparer: Comparer) -> dict:
    """Backbone comparisons per strategy, fine-tune vs probe per backbone, and the most disputed tail tags."""
    scored = [p for p in pairs if p.complete and p.reference is not None]
    by_key = {(p.family, p.strategy): p for p in scored}
    families = list(dict.fromkeys(p.family for p in scored))
    strategies = list(dict.fromkeys(p.strategy for p in scored))
    backbones = []
    for strategy in strategies:
        for fa, fb in combinations(families, 2):
            a, b = by_key.get((fa, strategy)), by_key.get((fb, strategy))
            if a is not None and b is not None:
                res = comparer.compare(a.reference, b.reference, TAIL)
                backbones.append({"strategy": strategy, "a": a.name, "b": b.name, "result": res})
    finetune = []
    for family in families:
        ft, probe = by_key.get((family, "ft")), by_key.get((family, "probe"))
        if ft is not None and probe is not None:
            finetune.append({"family": family, "ft": ft.name, "probe": probe.name,
                             "tail_f1": {p.name: p.reference.get("buckets.tail.macro_f1").to_json()
                                         for p in (ft, probe)},
                             "result": comparer.compare(ft.reference, probe.reference, TAIL)})
    pretrained = [p for p in scored if not p.random_init]
    spread = pretrained if len({p.family for p in pretrained}) >= 2 else scored
    return {"pairs": [p.name for p in scored], "random_init": [p.name for p in scored if p.random_init],
            "tail_f1": {p.name: {**p.reference.get("buckets.tail.macro_f1").to_json(),
                                 "ci": p.reference.get("ci.tail_macro_f1").value,
                                 "n_tags_scored": p.reference.get("buckets.tail.n_tags_scored").value,
                                 "n_tags": p.reference.get("buckets.tail.n_tags").value}
                        for p in scored},
            "leader": leader(scored, comparer),
            "threshold": scored[0].reference.get("buckets.tail.train_count_range.1").value if scored else None,
            "backbones": backbones, "finetune": finetune, "fields": by_field(scored), "disagreements": disagreements(spread),
            "left_out_of_disagreements": [p.name for p in scored if p not in spread],
            "paired_bootstrap": comparer.available, "unavailable": comparer.unavailable}


def _tail_value(pair: Pair) -> float:
    v = pair.reference.get("buckets.tail.macro_f1").value
    return -1.0 if v is None else v


def leader(scored: list[Pair], comparer: Comparer) -> dict | None:
    """The pair with the highest long-tail macro-F1, the runner-up on the tail, and their paired bootstrap on the
    tail tags (None when there is no runner-up)."""
    ranked = sorted(scored, key=_tail_value, reverse=True)
    if len(ranked) < 2:
        return None
    first, second = ranked[:2]
    return {"pair": first.name, "runner_up": second.name,
            "result": comparer.compare(first.reference, second.reference, TAIL)}


def by_field(pairs: list[Pair]) -> dict[str, dict]:
    """Per field (the ``field`` of ``field=value`` tags), per pair: how many of its tags have a test positive, their
    macro-F1, and the same over its long-tail tags; {} when no tag names a field."""
    out: dict[str, dict] = {}
    for p in pairs:
        for field in dict.fromkeys(t["name"].split("=", 1)[0] for t in p.reference.per_tag if "=" in t["name"]):
            scored = [t for t in p.reference.per_tag if t["name"].startswith(field + "=") and t["support"]
                      and t["f1"] is not None]
            tail = [t["f1"] for t in scored if t["bucket"] == TAIL]
            out.setdefault(field, {})[p.name] = {
                "n_tags": len(scored), "macro_f1": sum(t["f1"] for t in scored) / len(scored) if scored else None,
                "n_tail": len(tail), "tail_macro_f1": sum(tail) / len(tail) if tail else None}
    return out


def disagreements(pairs: list[Pair], n: int = N_DISAGREE) -> list[dict]:
    """Tail tags with a test positive, ranked by the spread (max - min) of their F1 across ``pairs``; tags are
    matched by name, and every pair's per_tag.csv must list the same tags."""
    if len(pairs) < 2:
        return []
    tables = {p.name: {r["name"]: r for r in p.reference.per_tag} for p in pairs}
    first = pairs[0]
    for p in pairs[1:]:
        if tables[p.name].keys() != tables[first.name].keys():
            odd = sorted(tables[p.name].keys() ^ tables[first.name].keys())
            raise ReportError(f"{p.reference.dir / PER_TAG}: its tags differ from {first.reference.dir / PER_TAG} "
                              f"({len(odd)} in one only, e.g. {odd[:3]}); re-evaluate on one dataset version")
    sources = [f"{p.reference.rel.rsplit('/', 1)[0]}/{PER_TAG}" for p in pairs]
    rows = []
    for name, tag in tables[first.name].items():
        if tag["bucket"] != TAIL or not tag["support"]:
            continue
        f1 = {pair: t[name]["f1"] for pair, t in tables.items()}
        values = [v for v in f1.values() if v is not None]
        rows.append({"tag": name, "train_count": int(tag["train_count"]), "support": int(tag["support"]),
                     "f1": f1, "spread": max(values) - min(values), "sources": sources})
    rows.sort(key=lambda r: (-r["spread"], r["tag"]))
    return rows[:n]


def _comparison(res: dict | None, a: str, b: str) -> list[str]:
    if res is None:
        return [f"{a} − {b}", fmt.DASH, fmt.DASH, fmt.DASH]
    return [f"{a} − {b}", fmt.signed_ci(res["observed_diff"], res["ci"]), f"{res['p_a_better']:.2f}",
            _verdict(res, a, b)]


def _finetune_item(c: dict, shown: dict[str, str], random: list[str]) -> str:
    """One backbone's "does fine-tuning help the tail" sentence, flagged when a pair of it is random-init."""
    res = c["result"]
    name = FAMILY_LABELS.get(c["family"], c["family"])
    ft, probe = shown[c["ft"]], shown[c["probe"]]
    if res is None:
        text = (f"{name}: fine-tune {fmt.num(c['tail_f1'][c['ft']]['value'])} vs probe "
                f"{fmt.num(c['tail_f1'][c['probe']]['value'])} (no paired test possible).")
    else:
        effect = (("fine-tuning **helps** the tail" if res["observed_diff"] > 0 else "fine-tuning **hurts** the tail")
                  if res["separated"] else f"fine-tuning's effect on the tail is **{INCONCLUSIVE}**")
        text = (f"{name}: {effect} ({ft} − {probe} {fmt.signed_ci(res['observed_diff'], res['ci'])}, "
                f"P(fine-tune better) = {res['p_a_better']:.2f}).")
    if {c["ft"], c["probe"]} & set(random):
        text += " Random init: this says nothing about fine-tuning the pretrained backbone."
    return text


def _leader_text(analysis: dict, shown: dict[str, str]) -> str:
    """``Highest long-tail macro-F1: cnn-ft 0.240 [...]; against the runner-up on the tail, ...: inconclusive ...``"""
    tail, lead = analysis["tail_f1"], analysis["leader"]
    name = lead["pair"] if lead else next(iter(tail))
    text = f"Highest long-tail macro-F1: **{shown[name]}** {fmt.with_ci(tail[name]['value'], tail[name]['ci'])}"
    if lead is None:
        return text + "."
    runner, res = lead["runner_up"], lead["result"]
    text += f"; the runner-up on the tail is {shown[runner]} ({fmt.num(tail[runner]['value'])})"
    if res is None:
        return text + " (no paired test possible)."
    verdict = "separated: the 95% CI excludes 0" if res["separated"] else INCONCLUSIVE
    return text + (f", difference {fmt.signed_ci(res['observed_diff'], res['ci'])}, P({name} better) = "
                   f"{res['p_a_better']:.2f} — {verdict}.")


def blocks(analysis: dict, sources: str, subset: str) -> list[Block]:
    """The section's paragraphs and tables; ``sources`` names the files its numbers come from, ``subset`` says
    when the runs trained on part of the train split whose counts the buckets use."""
    out: list[Block] = []
    tail = analysis["tail_f1"]
    if not tail:
        return [Para("No pair has a scored PyTorch evaluation yet: nothing to say about the long tail.")]
    random = analysis["random_init"]
    shown = {p: p + (RANDOM_INIT if p in random else "") for p in analysis["pairs"]}
    counts = next(iter(tail.values()))
    out.append(Para(f"Long-tail tags have fewer than {analysis['threshold']} training images in the train split "
                    f"({counts['n_tags_scored']} of the {counts['n_tags']} long-tail tags have a test positive). "
                    + (f"{subset} " if subset else "") + _leader_text(analysis, shown)
                    + " Differences below are paired bootstraps over the test images on the tail tags only (P = share "
                    f"of resamples where the first pair is better; sources: {sources})."
                    + (f" Random-init pairs ({', '.join(random)}) are not a valid comparison with the pretrained "
                       "ones." if random else "")))
    if not analysis["paired_bootstrap"]:
        out.append(Para(f"No paired comparison could be made: {analysis['unavailable']}."))
    header = ["comparison (tail macro-F1)", "difference [95% CI]", "P(first better)", "verdict"]
    if analysis["backbones"]:
        rows = [_comparison(c["result"], shown[c["a"]], shown[c["b"]]) for c in analysis["backbones"]]
        strategies = [STRATEGY_LABELS.get(c["strategy"], c["strategy"]) for c in analysis["backbones"]]
        out.append(Table(["strategy", *header], [[s, *r] for s, r in zip(strategies, rows)]))
    if analysis["finetune"]:
        out += [Para("Does fine-tuning help or hurt the tail?"),
                Bullets([_finetune_item(c, shown, random) for c in analysis["finetune"]])]
    if analysis["fields"]:
        names = analysis["pairs"]
        rows = [[field, f"{next(iter(per.values()))['n_tags']} ({next(iter(per.values()))['n_tail']})",
                 *[f"{fmt.num(per[n]['macro_f1'])} ({fmt.num(per[n]['tail_macro_f1'])})" if n in per else fmt.DASH
                   for n in names]]
                for field, per in analysis["fields"].items()]
        out += [Para("Field by field: macro-F1 over each field's tags with a test positive, and in brackets over its "
                     "long-tail tags (no CI: the bootstraps above are over all tags or all tail tags). A field far "
                     "below the others caps the overall macro-F1 whatever the tail methods do."),
                Table(["field", "tags (long-tail)", *[shown[n] for n in names]], rows)]
    if analysis["disagreements"]:
        names = list(analysis["disagreements"][0]["f1"])
        rows = [[r["tag"], f"{r['train_count']:,}", f"{r['support']:,}",
                 *[fmt.num(r["f1"][n], 2) for n in names], fmt.num(r["spread"], 2)]
                for r in analysis["disagreements"]]
        left_out = analysis["left_out_of_disagreements"]
        out.append(Para(f"The {len(rows)} rare tags where the pairs disagree most (per-tag test F1; with this few "
                        "test positives a single image moves a tag's F1 a lot, so read these as examples, not "
                        "verdicts)"
                        + (f"; random-init pairs ({', '.join(left_out)}) are left out of the spread" if left_out
                           else "") + "." + (f" {subset}" if subset else "")))
        out.append(Table(["tag", "training images in the train split", "test positives",
                          *[shown[n] for n in names], "spread"], rows))
    return out
