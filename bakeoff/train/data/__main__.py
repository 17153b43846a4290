"""python -m train.data {import csv|import fashion-styles|synth|prepare|cache|stats} ...

Tables and JSON (prepare's and stats' statistics) go to stdout; status to stderr: -q shows warnings and errors
only (and no progress bars), -v adds debug detail (timings, paths). -v/-q go before or after the step.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from bakeoff.common.log import add_verbosity_flags, progress_enabled, setup_logging
from bakeoff.train.data.cache import build_cache, cache_status
from bakeoff.train.data.dataset import DatasetError, load_dataset
from bakeoff.train.data.importers import COLUMN_NAMES, DEFAULT_IMAGE_PATTERN, import_csv, import_fashion_styles
from bakeoff.train.data.splits import format_stats, prepare

log = logging.getLogger("bakeoff.train.data")  # not __name__: python -m train.data runs this module as __main__

WORKERS_HELP = "worker processes (default: all CPUs)"
NO_PROGRESS_HELP = "no progress bar"


def _subparser(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose help is also its description (with -v/-q: they may follow the step's name)."""
    return add_verbosity_flags(sub.add_parser(name, help=help, description=help))


def _names(role: str) -> str:
    """The column names detected for ``role``, for help texts."""
    return ", ".join(COLUMN_NAMES[role])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.data", description="Make a bake-off dataset from a catalog.")
    add_verbosity_flags(p)
    sub = p.add_subparsers(dest="cmd", required=True, help="step")

    imp = _subparser(sub, "import", "import a catalog").add_subparsers(dest="kind", required=True,
                                                                       help="catalog layout")
    c = _subparser(imp, "csv", "a CSV of id + tags column, or id + attribute columns; columns not given are "
                               "found by name (case-insensitive)")
    c.add_argument("src", help="the catalog CSV")
    c.add_argument("--image-root", required=True, help="folder the image paths (or pattern) are relative to")
    c.add_argument("--id-column", help=f"id column (default: the one column named {_names('id')})")
    c.add_argument("--image-column", help=f"column with the image path (default: the one column named "
                                          f"{_names('image')}; with none, --image-pattern)")
    c.add_argument("--image-pattern", help=f"image path from the id, instead of an image column "
                                           f"(default: {DEFAULT_IMAGE_PATTERN} when there is no image column)")
    c.add_argument("--tags-column", help=f"column of tags joined by --sep (default: the one column named "
                                         f"{_names('tags')}, unless --attribute-columns)")
    c.add_argument("--sep", default="|", help="separator inside the tags column (default: %(default)s)")
    c.add_argument("--attribute-columns", help="comma-separated columns that become field=value tags")
    c.add_argument("--taxonomy", help="taxonomy.json or a text file of allowed tags (unknown tags are rejected)")
    f = _subparser(imp, "fashion-styles", "Kaggle 'Fashion Product Images' layout: styles.csv + images/ID.jpg")
    f.add_argument("src", help="the folder holding styles.csv and images/")
    for q in (c, f):
        q.add_argument("--out", required=True, help="dataset directory to write")
        q.add_argument("--max-rejected", type=float, default=0.01,
                       help="fail above this rejected fraction (default: %(default)s)")
        q.add_argument("--no-verify", action="store_true", help="skip decoding images (faster, less safe)")
        q.add_argument("--workers", type=int, help=f"image-check {WORKERS_HELP}")
        q.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)

    s = _subparser(sub, "synth", "the embedded default: a procedural retail catalog")
    s.add_argument("--out", required=True, help="dataset directory to write")
    s.add_argument("--images", type=int, default=3000, help="number of images (default: %(default)s)")
    s.add_argument("--tags", type=int, default=250, help="number of tags, Zipf long tail (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    s.add_argument("--image-size", type=int, default=64, help="image side in px (default: %(default)s)")
    s.add_argument("--workers", type=int, help=WORKERS_HELP)

    pr = _subparser(sub, "prepare", "splits (iterative stratification) + stats")
    pr.add_argument("dataset", help="dataset directory (python -m train.data import ...)")
    pr.add_argument("--test-size", type=float, default=5000,
                    help="test images (>= 1) or a fraction (< 1) (default: %(default)s)")
    pr.add_argument("--val-fraction", type=float, default=0.1,
                    help="fraction of the non-test images for validation (default: %(default)s)")
    pr.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    pr.add_argument("--long-tail", type=int, default=50,
                    help="long tail: fewer than this many train images (default: %(default)s)")
    pr.add_argument("--method", default="iterative", choices=("iterative", "random"),
                    help="iterative multi-label stratification, or a plain random split (default: %(default)s)")
    pr.add_argument("--cache-size", type=int, default=0,
                    help="also build the image cache at this size now (default: 0, no: python -m train builds it "
                         "at the largest input size of its runs, so no model sees an upsampled image)")

    ca = _subparser(sub, "cache", "build (or finish) the uint8 image cache")
    ca.add_argument("dataset", help="dataset directory")
    ca.add_argument("--size", type=int, default=128, help="cached image side in px (default: %(default)s)")
    ca.add_argument("--workers", type=int, help=WORKERS_HELP)
    ca.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)

    st = _subparser(sub, "stats", "images, tags, splits, long tail, rejected rows")
    st.add_argument("dataset", help="dataset directory")
    st.add_argument("--json", action="store_true", help="print stats.json's content instead of the table")
    return p


def main(argv: list[str] | None = None) -> int:
    a = setup_logging(parser().parse_args(argv))
    start = time.perf_counter()
    try:
        if a.cmd == "import":
            common = {"max_rejected": a.max_rejected, "verify_images": not a.no_verify, "workers": a.workers,
                      "progress": progress_enabled(a), "log": log.info}
            if a.kind == "csv":
                cols = a.attribute_columns.split(",") if a.attribute_columns else None
                res = import_csv(a.src, a.image_root, a.out, id_column=a.id_column, image_column=a.image_column,
                                 image_pattern=a.image_pattern, tags_column=a.tags_column, sep=a.sep,
                                 attribute_columns=cols, taxonomy=a.taxonomy, **common)
            else:
                res = import_fashion_styles(a.src, a.out, **common)
            done, *rejected = res.summary().split("\n", 1)
            log.info(done)
            if rejected:
                log.warning(rejected[0])
        elif a.cmd == "synth":
            from bakeoff.train.data.synth import generate

            ds = generate(a.out, n_images=a.images, n_tags=a.tags, seed=a.seed, image_size=a.image_size, workers=a.workers)
            log.info(f"{a.out}: {len(ds)} synthetic images, {len(ds.taxonomy)} tags")
        elif a.cmd == "prepare":
            test = int(a.test_size) if a.test_size >= 1 else a.test_size
            stats = prepare(a.dataset, test_size=test, val_fraction=a.val_fraction, seed=a.seed,
                            long_tail_threshold=a.long_tail, method=a.method)
            print(format_stats(stats))
            if a.cache_size:
                build_cache(load_dataset(a.dataset), a.cache_size, progress=progress_enabled(a))
                log.info(cache_status(load_dataset(a.dataset), a.cache_size))
            else:
                log.info("image cache: built by python -m train at its runs' largest input size (--cache-size S: now)")
        elif a.cmd == "cache":
            ds = load_dataset(a.dataset)
            build_cache(ds, a.size, workers=a.workers, progress=progress_enabled(a))
            log.info(cache_status(ds, a.size))
        elif a.cmd == "stats":
            stats = load_dataset(a.dataset).stats()
            print(json.dumps(stats, indent=2) if a.json else format_stats(stats))
    except (DatasetError, FileNotFoundError, ValueError) as e:
        log.error(str(e))
        return 2
    log.debug(f"{a.cmd} done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
