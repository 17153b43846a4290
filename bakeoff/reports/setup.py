"""The Setup section: what each run trained, from its config.json and history.jsonl and the dataset's splits.json.

First the training profile (config.json ``profile`` = {"name", "reductions"}: every reduction against the full
profile; runs trained before profiles were recorded say so), then per pair: the model, its input size and
weights, the training images used against the train split, the schedule (fine-tune epochs and the best epoch,
or the probe's sweep), and whether augmentation was on.
"""
from __future__ import annotations

import json

from bakeoff.reports import fmt, protocol
from bakeoff.reports.artifacts import Pair, Sourced, dig
from bakeoff.reports.document import Block, Bullets, Para, Table

WEIGHTS = {"file": "pretrained (local file)", "hub": "pretrained (hub cache)", "random": "random init"}
UNDER_TRAINED = "= last: may be under-trained"


def training_subset(prov: dict) -> dict | None:
    """Runs that trained on part of the train split (config.json dataset.n_train_used below splits.json's train
    size): ``{"train_split", "used": {pair: images}, "every_run", "sources"}``; None when none did, or when the
    dataset's splits.json is out of reach."""
    for d in prov["datasets"]:
        split = (d.get("split_sizes") or {}).get("train")
        used = {pair: n for pair, n in d["n_train_used"].items() if split and n is not None and n < split}
        if used:
            return {"train_split": split, "used": used, "every_run": len(used) == len(d["n_train_used"]),
                    "sources": ["config.json dataset.n_train_used", f"{d['path']}/splits.json sizes.train"]}
    return None


def subset_sentence(sub: dict | None) -> str:
    """``Training-image counts are the whole train split's (35,165 images); the runs saw a 12,000-image stratified
    subset of it, about 34%.`` ("" when every run trained on the whole split)."""
    if sub is None:
        return ""
    split, groups = sub["train_split"], {}
    for pair, n in sub["used"].items():
        groups.setdefault(n, []).append(pair)
    if sub["every_run"] and len(groups) == 1:
        (n,) = groups
        saw = f"the runs saw a {n:,}-image stratified subset of it, about {n / split:.0%}"
    else:
        saw = "; ".join(f"{', '.join(pairs)} saw a {n:,}-image stratified subset of it, about {n / split:.0%}"
                        for n, pairs in groups.items())
        saw += "" if sub["every_run"] else "; the other runs saw all of it"
    return f"Training-image counts are the whole train split's ({split:,} images); {saw}."


def best_epoch(history: list[dict]) -> tuple[int, int] | None:
    """(epoch of the highest validation mAP, last epoch) of a fine-tune's history.jsonl (its final run's records,
    ``"run": "final"``, when it has trials); None without epochs."""
    final = [r for r in history if r.get("run") == "final"]
    scored = [r for r in final or history if isinstance(r.get("val_map"), (int, float)) and "epoch" in r]
    if not scored:
        return None
    best = max(scored, key=lambda r: r["val_map"])  # the first of equal maxima
    return best["epoch"], max(r["epoch"] for r in scored)


def schedule(pair: Pair) -> tuple[list[str], dict]:
    """The training schedule in words, and its values with their sources."""
    cfg = pair.config
    if pair.strategy == "probe":
        sweep, epochs, chosen = (cfg.get("summary.sweep"), cfg.get("summary.probe.epochs"),
                                 cfg.get("summary.selected.epoch"))
        n = len(sweep.value) if sweep.value is not None else None
        lines = [f"linear probe: {n if n is not None else fmt.DASH} settings × {epochs.value} epochs",
                 f"selected at epoch {chosen.value}" + (f" {UNDER_TRAINED}"
                                                        if chosen.value is not None and chosen.value == epochs.value
                                                        else f" of {epochs.value}")]
        return lines, {"sweep_size": Sourced(n, cfg.rel, "len(summary.sweep)").to_json(),
                       "epochs": epochs.to_json(), "selected_epoch": chosen.to_json()}
    epochs = cfg.get("summary.finetune.epochs")
    if epochs.value is None:
        epochs = cfg.get("options.epochs")
    lines = [f"fine-tune: {epochs.value if epochs.value is not None else fmt.DASH} epochs"
             + (", from the linear probe's head" if pair.starts_from_probe else "")]
    values = {"epochs": epochs.to_json()}
    if dig(cfg.doc, "summary.result.stopped_early"):
        lines.append(f"stopped early after epoch {dig(cfg.doc, 'summary.result.epochs')}")
    history = pair.history
    best = best_epoch(history.value) if history is not None else None
    if best is None:
        lines.append("best epoch: — (no history.jsonl)")
    else:
        lines.append(f"best epoch {best[0]}" + (f" {UNDER_TRAINED}" if best[0] == best[1] else f" of {best[1]}"))
        values["best_epoch"] = {"value": best[0], "last_epoch": best[1], "source": history.source,
                                "field": "epoch of the highest val_map"}
    return lines, values


def setup_rows(pairs: list[Pair], sub: dict | None) -> list[dict]:
    """One row per pair: model, input size, weights, training images (and the split's size), schedule,
    augmentation, each with its source."""
    split = sub["train_split"] if sub else None
    rows = []
    for p in pairs:
        cfg = p.config
        lines, values = schedule(p)
        rows.append({"pair": p.name, "model": cfg.get("backbone.name").to_json(),
                     "label": cfg.get("backbone.label").value, "library": cfg.get("backbone.library").value,
                     "input_px": cfg.get("preprocess.img_size").to_json(), "grid": protocol.token_grid(cfg.doc),
                     "head": protocol.head_text(cfg.doc), "tuning": protocol.tuning_text(cfg.doc),
                     "weights_label": cfg.get("weights.label").value, "weights": cfg.get("weights.kind").to_json(),
                     "train_images": cfg.get("dataset.n_train_used").to_json(), "train_split": split,
                     "schedule": values, "schedule_text": lines, "augment": cfg.get("options.augment").to_json(),
                     "aug_views": cfg.get("options.aug_views").to_json(), "profile": cfg.get("profile").to_json()})
    return rows


def profile_blocks(rows: list[dict]) -> list[Block]:
    """The profile(s) the runs trained with, each with its reductions against the full profile."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(json.dumps(r["profile"]["value"], sort_keys=True), []).append(r["pair"])
    out: list[Block] = []
    for key, pairs in groups.items():
        profile = json.loads(key)
        which = "" if len(groups) == 1 else f" ({', '.join(pairs)})"
        if not isinstance(profile, dict):
            out.append(Para(f"Profile{which}: not recorded (config.json has no \"profile\": trained before "
                            f"profiles were recorded), so any reductions are not listed here."))
            continue
        reductions = profile.get("reductions") or []
        out.append(Para(f"Profile{which}: **{profile.get('name', fmt.DASH)}**; "
                        + (f"{len(reductions)} reductions against the full profile (native input sizes, default "
                           f"schedules, the whole train split):" if reductions
                           else "no reductions against the full profile.")))
        if reductions:
            out.append(Bullets(list(reductions)))
    return out


def _images(row: dict) -> str:
    n, split = row["train_images"]["value"], row["train_split"]
    if n is None:
        return fmt.DASH
    return f"{n:,}" + (f" of {split:,} ({n / split:.0%})" if split and n < split else "")


def augmentation(row: dict) -> str:
    """``off``, ``online: flip + shift`` (``--augment``) or ``K cached views: crop + flip`` (``--aug-views K``)."""
    online, views = row["augment"]["value"], row.get("aug_views", {}).get("value")
    if online:
        return "online: flip + shift"
    if views:
        return f"{views} cached view{'s' * (views > 1)} per image: crop + flip"
    return {False: "off"}.get(online, fmt.DASH)


def blocks(rows: list[dict], sub: dict | None, notes: list[str] = ()) -> list[Block]:
    """The section: the subset sentence, then one table row per pair, then ``notes`` (resolution, budgets)."""
    table = [[f"**{r['pair']}**", [r["weights_label"] or r["label"] or fmt.DASH,
                                   f"{r['model']['value']} ({r['library']})"],
              [f"{r['input_px']['value']} px", r["grid"]],
              WEIGHTS.get(r["weights"]["value"], str(r["weights"]["value"])),
              _images(r), r["head"], [*r["schedule_text"], r["tuning"]],
              augmentation(r)]
             for r in rows]
    intro = ("What each run trained, from its config.json (fine-tune best epoch: history.jsonl; train split size: "
             "the dataset's splits.json). " + subset_sentence(sub))
    return [*profile_blocks(rows), Para(intro.strip()),
            Table(["Pair", "Model", "Input", "Weights", "Training images", "Head and decision rule",
                   "Schedule and tuning budget", "Augmentation"], table), *[Para(n) for n in notes if n]]
