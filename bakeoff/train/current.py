"""Whether a run is current: a run is complete only for the options it was trained with (DESIGN.md).

:func:`expected` lists what a run asked for with ``RunOptions`` would record, resolved (a registry default, a
model, an unset ``epochs`` and a weights plan count as what they resolve to: ``--image-size`` unset and ``224``
are the same run; an unset ``lr`` stays unset, as its meaning is the strategy's own default); :func:`recorded`
reads the same from a run's config.json; :func:`changes` says what differs, as ``image_size 112 -> 224``. Every
option counts, and one newer than the run counts as changed (what the run ran with is not recorded), except
those that do not change what a run learns:

- ``progress``, ``resume``: how a run is driven, not what it learns;
- ``device``: the same options give the same run up to floating-point noise on any device (a GPU appearing must
  not retrain every run);
- ``weights_dir`` and the ``weights`` choice itself: only the weights they resolve to count (kind, source, sha256);
- ``profile`` (its name and reductions, once recorded): its settings count through the options they set;
- per strategy, what it never reads: a probe ignores ``epochs``, ``lr``, ``augment``, ``trunk_cache_dtype``, and
  ``batch_size`` only batches its feature extraction (the feature cache key leaves it out too); a fine-tune ignores
  ``aug_views`` and the probe's options (``probe.*``), except with ``rebalance="crt"``, whose head is trained by
  the probe's sweep.

Options added after runs were recorded count, when a run does not record them, as the value that every run before
them trained with (:data:`EARLIER`): ``rebalance`` none, ``aug_views`` 0 and ``colour`` off did not exist
before, so such a run stays current for the default and is stale for any other value.

One resolved input is not an option: a fine-tune's start. The design's fine-tune is LP-then-FT; one that started
from a zero head because no matching probe run existed (config.json ``init_head.kind`` "zero") is stale once that
probe run is complete (``init_head zero -> linear probe``), as a run that fell back to random init is stale once its
weights resolve to a file. A fine-tune that started from a probe's head stays current when that probe is retrained:
it is LP-then-FT either way, and retraining every fine-tune after each probe would cost more than it tells.
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from bakeoff.common.io import sha256_file
from bakeoff.train.finetune import FinetuneConfig
from bakeoff.train.registry import BackboneSpec
from bakeoff.train.run import RunOptions, probe_mismatch
from bakeoff.train.weights import WeightsPlan

IGNORED = ("progress", "resume", "device", "weights_dir", "probe", "profile")
NOT_READ_BY = {"probe": ("epochs", "lr", "augment", "trunk_cache_dtype", "batch_size"), "ft": ("aug_views",)}
# what runs recorded before these options existed trained with
EARLIER = {"rebalance": "none", "aug_views": 0, "colour": False}
NOT_RECORDED = "(not recorded)"  # an option newer than the run: what it ran with is unknown, so it counts as changed


def _plain(v: Any) -> Any:
    """JSON's view of a value (tuples become lists), so recorded and requested values compare equal."""
    return json.loads(json.dumps(v))


def weights_label(kind: str, source: str, sha256: str | None) -> str:
    """One comparable string for where weights come from: ``random``, ``hub ID``, ``file PATH (sha256 ...)``."""
    if kind == "random":
        return "random"
    return f"{kind} {source}" + (f" (sha256 {sha256[:12]})" if sha256 else "")


def requested_weights(plan: WeightsPlan) -> str:
    """:func:`weights_label` of a weights plan, as ``create_backbone`` will record it (a file is hashed)."""
    if plan.kind == "file" and Path(plan.source).is_file():
        return weights_label("file", str(Path(plan.source).resolve()), sha256_file(plan.source))
    return weights_label(plan.kind, plan.source, None)


def _options(options: dict, strategy: str) -> dict[str, Any]:
    """The options that change what a ``strategy`` run learns (an unset ``epochs`` is the default schedule's)."""
    kept = {f.name: options.get(f.name, EARLIER.get(f.name, NOT_RECORDED)) for f in fields(RunOptions)
            if f.name not in IGNORED and f.name not in NOT_READ_BY[strategy]}
    if kept.get("epochs", NOT_RECORDED) is None:
        kept["epochs"] = FinetuneConfig.epochs
    return kept


def _trains_probe(strategy: str, rebalance: str) -> bool:
    """Whether a run's head is trained by the probe's sweep (a probe; a fine-tune with cRT), so reads ``probe.*``."""
    return strategy == "probe" or rebalance == "crt"


def expected(opts: RunOptions, spec: BackboneSpec, weights: str, dataset_hash: str) -> dict[str, Any]:
    """What a run trained with ``opts`` records, resolved (``weights``: :func:`requested_weights`)."""
    out = _options(_plain(asdict(opts)), opts.strategy)
    out |= {"model": spec.name, "image_size": spec.img_size, "weights": weights, "dataset": dataset_hash[:12]}
    if _trains_probe(opts.strategy, opts.rebalance):
        out |= {f"probe.{k}": v for k, v in _plain(asdict(opts.probe)).items()}
    return out


def recorded(config: dict) -> dict[str, Any]:
    """What a run's config.json says it was trained with, in :func:`expected`'s terms. The probe's options are
    ``options.probe`` as asked for; a config without them has only the probe's epochs, in ``summary.probe`` (a
    fine-tune's cRT head: ``summary.crt.probe``; the resolved sweep, written once the run is complete: its other
    fields derive from ``trials``)."""
    w = config.get("weights", {})
    out = _options(config.get("options", {}), config["strategy"])
    out |= {"model": config["backbone"]["name"], "image_size": config["backbone"]["img_size"],
            "weights": weights_label(w.get("kind"), w.get("source"), w.get("sha256")),
            "dataset": config["dataset"]["hash"][:12]}
    if "cache_size" in config.get("preprocess", {}):
        out["cache_size"] = config["preprocess"]["cache_size"]
    if _trains_probe(config["strategy"], out["rebalance"]):
        asked = config.get("options", {}).get("probe")
        summary = config.get("summary", {})
        resolved = (summary if config["strategy"] == "probe" else summary.get("crt", {})).get("probe", {})
        out |= {f"probe.{k}": v for k, v in asked.items()} if asked is not None else (
            {"probe.epochs": resolved["epochs"]} if "epochs" in resolved else {})
    return out


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["image_size 112 -> 224", ...]``: the values of ``new`` that ``old`` records otherwise."""
    return [f"{k} {old[k]} -> {v}" for k, v in new.items() if k in old and old[k] != v]


def start_change(config: dict) -> list[str]:
    """``["init_head zero -> linear probe (...)"]`` for a fine-tune that started from a zero head when the probe run
    it looked for now matches it; else empty."""
    init = config.get("init_head") or {}
    if init.get("kind") != "zero":
        return []
    probe = Path(init["probe_run"])
    if probe_mismatch(probe, config["backbone"], config["weights"], config["dataset"]["hash"],
                      config["options"]["head"], config["options"].get("colour", False)):
        return []
    return [f"init_head zero -> linear probe ({probe} is complete now)"]


def run_changes(config: dict, opts: RunOptions, spec: BackboneSpec, weights: str, dataset_hash: str) -> list[str]:
    """What differs between the run ``config`` records and the one ``opts`` asks for, and a fine-tune's zero start
    whose probe now exists (empty: it is current)."""
    return changes(recorded(config), expected(opts, spec, weights, dataset_hash)) + start_change(config)
