"""The provenance footer: dataset, splits, weights per backbone, library versions and devices, from artifacts."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from bakeoff.common.io import read_json
from bakeoff.reports.artifacts import Pair
from bakeoff.reports.document import Block, Bullets, Heading, Table
from bakeoff.train.data.dataset import SPLITS

WHEN = {"training": "training-time", "evaluation": "evaluation-time", "benchmarks": "benchmark-time"}


def training_versions(config: dict) -> dict[str, str]:
    """Library versions config.json recorded at training time: ``versions``; runs trained before that record
    only ``torch``."""
    return config.get("versions") or ({"torch": config["torch"]} if config.get("torch") else {})


def _collect(pairs: list[Pair]) -> dict:
    versions: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    devices: dict[str, set] = defaultdict(set)
    for p in pairs:
        for lib, v in training_versions(p.config.doc).items():
            versions[lib][v].add(WHEN["training"])
        if p.timing is not None and p.timing.doc.get("device"):
            devices["training"].add(p.timing.doc["device"])
        for ev in p.evals.values():
            devices["evaluation"].add(ev.doc.get("device"))
            for lib, v in (ev.doc.get("versions") or {}).items():
                versions[lib][v].add(WHEN["evaluation"])
        for lat in p.measured():
            devices["latency"].add(lat.device)
            for lib, v in lat.versions.items():
                versions[lib][v].add(WHEN["benchmarks"])
        for engine in p.engines:
            sm = str(engine.get("compute_capability")).replace(".", "")
            devices["TensorRT engine build"].add(f"{engine.get('gpu')} (sm_{sm}, TensorRT {engine.get('tensorrt')})")
    return {"versions": {lib: {v: sorted(used) for v, used in vs.items()} for lib, vs in sorted(versions.items())},
            "devices": {k: sorted(d for d in v if d) for k, v in devices.items()}}


def _split_meta(dataset_path: str | None) -> dict:
    """splits.json's sizes and method, when the dataset directory is reachable (else nothing)."""
    path = Path(str(dataset_path)) / SPLITS
    if not path.is_file():
        return {}
    meta = read_json(path)
    return {"split_sizes": meta.get("sizes"), "split_method": meta.get("method")}


def provenance(pairs: list[Pair]) -> dict:
    """Dataset hash and counts, split seed, weights per backbone, library versions, devices."""
    datasets: dict[str, dict] = {}
    for p in pairs:
        d = p.config.doc.get("dataset", {})
        if d.get("hash") not in datasets:
            datasets[d.get("hash")] = {
                "path": d.get("path"), "hash": d.get("hash"), "n_images": d.get("n_images"),
                "n_tags": len(p.config.doc.get("taxonomy", [])), "split_seed": d.get("split_seed"),
                "n_val": d.get("n_val"), "n_train_used": {}, "source": p.config.rel, **_split_meta(d.get("path"))}
        datasets[d.get("hash")]["n_train_used"][p.name] = d.get("n_train_used")
    weights = {}
    for p in pairs:
        b = p.config.doc.get("backbone", {})
        w = p.config.doc.get("weights", {})
        weights.setdefault((p.family, b.get("name"), w.get("kind"), w.get("source"), w.get("sha256")), {
            "family": p.family, "model": b.get("name"), "label": b.get("label"), "library": b.get("library"),
            "img_size": b.get("img_size"), "kind": w.get("kind"), "source": w.get("source"), "sha256": w.get("sha256"),
            "pairs": [], "from": p.config.rel})["pairs"].append(p.name)
    return {"datasets": list(datasets.values()), "weights": list(weights.values()), **_collect(pairs)}


def blocks(prov: dict) -> list[Block]:
    out: list[Block] = [Heading("Provenance")]
    items = []
    for d in prov["datasets"]:
        sizes = d.get("split_sizes") or {}
        used = sorted({v for v in d["n_train_used"].values() if v is not None})
        items.append(
            f"Dataset {d['path']} — hash {d['hash']}; {d['n_images']} images"
            + (f", {d['n_tags']} tags" if d.get("n_tags") else "")
            + (f"; splits {', '.join(f'{k} {v}' for k, v in sizes.items())} ({d.get('split_method')})" if sizes else "")
            + f"; split seed {d['split_seed']}; training images used per run: {', '.join(map(str, used)) or '—'}"
            + f"; validation {d['n_val']}.")
    items += [f"{k.capitalize()} device(s): {'; '.join(v)}." for k, v in prov["devices"].items() if v]
    items.append("Library versions, as each stage recorded them (training-time: config.json, where runs trained "
                 "before it recorded versions give torch only; evaluation-time: eval/*/metrics.json; benchmark-time: "
                 "latency/*.json): " + "; ".join(
        f"{lib} " + ", ".join(f"{v} ({'/'.join(used)})" for v, used in vs.items())
        for lib, vs in prov["versions"].items()) + ".")
    out.append(Bullets(items))
    rows = [[w["family"], f"{w['model']} ({w['library']}, {w['img_size']} px)", w["kind"] or "—",
             str(w["source"] or "—"), (w["sha256"] or "—")[:16] + ("…" if w["sha256"] else ""),
             ", ".join(w["pairs"])]
            for w in prov["weights"]]
    out.append(Table(["backbone", "model", "weights", "source", "sha256", "pairs"], rows,
                     ["Full hashes, versions and every number's source file: summary.json."]))
    return out
