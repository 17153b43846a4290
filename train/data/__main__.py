"""python -m train.data {import csv|import fashion-styles|synth|prepare|cache|stats} ..."""
from __future__ import annotations

import argparse
import json
import sys

from train.data.cache import build_cache, cache_status
from train.data.dataset import DatasetError, load_dataset
from train.data.importers import import_csv, import_fashion_styles
from train.data.splits import format_stats, prepare


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.data", description="Make a bake-off dataset from a catalog.")
    sub = p.add_subparsers(dest="cmd", required=True)

    imp = sub.add_parser("import", help="import a catalog").add_subparsers(dest="kind", required=True)
    c = imp.add_parser("csv", help="a CSV of id + tags column, or id + attribute columns")
    c.add_argument("src")
    c.add_argument("--image-root", required=True)
    c.add_argument("--id-column", default="id")
    c.add_argument("--image-column", help="column with the image path (default: --image-pattern)")
    c.add_argument("--image-pattern", default="{id}.jpg")
    c.add_argument("--tags-column")
    c.add_argument("--sep", default="|", help="separator inside the tags column")
    c.add_argument("--attribute-columns", help="comma-separated columns that become field=value tags")
    c.add_argument("--taxonomy", help="taxonomy.json or a text file of allowed tags (unknown tags are rejected)")
    f = imp.add_parser("fashion-styles", help="Kaggle 'Fashion Product Images' layout: styles.csv + images/ID.jpg")
    f.add_argument("src")
    for q in (c, f):
        q.add_argument("--out", required=True)
        q.add_argument("--max-rejected", type=float, default=0.01, help="fail above this rejected fraction")
        q.add_argument("--no-verify", action="store_true", help="skip decoding images (faster, less safe)")
        q.add_argument("--workers", type=int)

    s = sub.add_parser("synth", help="the embedded default: a procedural retail catalog")
    s.add_argument("--out", required=True)
    s.add_argument("--images", type=int, default=3000)
    s.add_argument("--tags", type=int, default=250)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--workers", type=int)

    pr = sub.add_parser("prepare", help="splits (iterative stratification) + stats")
    pr.add_argument("dataset")
    pr.add_argument("--test-size", type=float, default=5000, help="images (>= 1) or a fraction (< 1)")
    pr.add_argument("--val-fraction", type=float, default=0.1)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--long-tail", type=int, default=50, help="long tail: fewer than this many train images")
    pr.add_argument("--method", default="iterative", choices=("iterative", "random"))
    pr.add_argument("--cache-size", type=int, default=128, help="also build the image cache at this size (0: skip)")

    ca = sub.add_parser("cache", help="build (or finish) the uint8 image cache")
    ca.add_argument("dataset")
    ca.add_argument("--size", type=int, default=128)
    ca.add_argument("--workers", type=int)

    st = sub.add_parser("stats", help="images, tags, splits, long tail, rejected rows")
    st.add_argument("dataset")
    st.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        if a.cmd == "import":
            common = dict(max_rejected=a.max_rejected, verify_images=not a.no_verify, workers=a.workers)
            if a.kind == "csv":
                cols = a.attribute_columns.split(",") if a.attribute_columns else None
                res = import_csv(a.src, a.image_root, a.out, id_column=a.id_column, image_column=a.image_column,
                                 image_pattern=a.image_pattern, tags_column=a.tags_column, sep=a.sep,
                                 attribute_columns=cols, taxonomy=a.taxonomy, **common)
            else:
                res = import_fashion_styles(a.src, a.out, **common)
            print(res.summary())
        elif a.cmd == "synth":
            from train.data.synth import generate

            ds = generate(a.out, n_images=a.images, n_tags=a.tags, seed=a.seed, image_size=a.image_size, workers=a.workers)
            print(f"{a.out}: {len(ds)} synthetic images, {len(ds.taxonomy)} tags")
        elif a.cmd == "prepare":
            test = int(a.test_size) if a.test_size >= 1 else a.test_size
            stats = prepare(a.dataset, test_size=test, val_fraction=a.val_fraction, seed=a.seed,
                            long_tail_threshold=a.long_tail, method=a.method)
            print(format_stats(stats))
            if a.cache_size:
                build_cache(load_dataset(a.dataset), a.cache_size)
                print(cache_status(load_dataset(a.dataset), a.cache_size))
        elif a.cmd == "cache":
            ds = load_dataset(a.dataset)
            build_cache(ds, a.size, workers=a.workers)
            print(cache_status(ds, a.size))
        elif a.cmd == "stats":
            stats = load_dataset(a.dataset).stats()
            print(json.dumps(stats, indent=2) if a.json else format_stats(stats))
    except (DatasetError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
