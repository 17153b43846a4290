"""Catalog importers: a product CSV + an image folder -> a validated dataset directory.

Every data row is either imported or listed in ``rejected.csv`` with its reason(s), so nothing is lost
silently. Row problems (a missing value, a duplicate id, a bad tag, non-UTF-8 bytes, a missing, empty,
undecodable or truncated image) reject the row; the import fails when more than ``max_rejected`` of the
rows are rejected. Structural problems (missing column, no data rows, conflicting options, missing image
root) fail at once. Reasons read ``"<kind>: <detail>"``; several are joined with ``"; "``.

Columns not given are found by name (``COLUMN_NAMES``, matched case-insensitively, with spaces and hyphens read
as underscores): the id and tags columns must be found (or, instead of tags, attribute columns given); with no
image column the image is ``{id}.jpg``. Two candidates for one role, or a required role without any, fail
with the file, its header and the flag to pass.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from bakeoff.common.io import read_json, sha256_bytes
from bakeoff.train.data import images
from bakeoff.train.data.dataset import (
    MANIFEST,
    REJECTED,
    SPLITS,
    STATS,
    TAG_SEP,
    TAXONOMY,
    Dataset,
    DatasetError,
    Rejected,
    write_dataset,
    write_rejected,
)

FASHION_ATTRIBUTES = ("gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage")

MISSING_VALUE = "missing value"
DUPLICATE_ID = "duplicate id"
EMPTY_TAGS = "empty tag list"
UNKNOWN_TAG = "unknown tag"
BAD_TAG = "bad tag"
NON_UTF8 = "non-UTF-8 text"
FIELD_COUNT = "wrong field count"
MULTILINE = "multi-line value"

# role -> the column names that fill it when no column is given (compared after _normalise)
COLUMN_NAMES = {
    "id": ("id", "sku", "product_id", "item_id"),
    "image": ("image", "image_path", "image_file", "img", "path", "file", "filename", "file_name", "photo"),
    "tags": ("tags", "labels", "tag", "label"),
}
DEFAULT_IMAGE_PATTERN = "{id}.jpg"
_FLAGS = {"id": "--id-column NAME", "image": "--image-column NAME or --image-pattern PATTERN",
          "tags": "--tags-column NAME or --attribute-columns A,B"}

_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by errors="surrogateescape"


@dataclass(frozen=True)
class Columns:
    """The columns an import reads; ``detected`` lists the roles not given explicitly."""

    id: str
    image: str | None  # None: the image is image_pattern.format(id=...)
    image_pattern: str | None
    tags: str | None
    attributes: tuple[str, ...] | None  # instead of tags: each value becomes the tag "column=value"
    detected: tuple[str, ...]

    def describe(self) -> str:
        """One line: each role's column, marking the detected ones."""
        def mark(role: str) -> str:
            return " (detected)" if role in self.detected else ""

        if self.image:
            image = f"image {self.image!r}{mark('image')}"
        else:
            found = " (no image column found)" if "image" in self.detected else ""
            image = f"image pattern {self.image_pattern!r}{found}"
        tags = (f"tags {self.tags!r}{mark('tags')}" if self.tags else
                "attribute tags " + ", ".join(map(repr, self.attributes or ())))
        return f"columns: id {self.id!r}{mark('id')}, {image}, {tags}"


@dataclass
class ImportResult:
    """What an import produced: the dataset, and the rows it did not import."""

    dataset: Dataset
    n_rows: int
    n_imported: int
    rejected: list[Rejected]
    seconds: float

    def summary(self) -> str:
        root = self.dataset.root
        lines = [
            f"imported {self.n_imported:,} of {self.n_rows:,} rows into {root} "
            f"({len(self.dataset.taxonomy):,} tags) in {self.seconds:.1f} s"
        ]
        if self.rejected:
            frac = len(self.rejected) / self.n_rows
            lines.append(f"rejected {len(self.rejected):,} rows ({frac:.2%}), listed in {root / REJECTED}:")
            kinds = Counter(part.split(":", 1)[0] for r in self.rejected for part in r.reason.split("; "))
            lines += [f"  {n:>7,}  {kind}" for kind, n in kinds.most_common()]
        return "\n".join(lines)


def import_csv(
    src_csv: str | os.PathLike,
    image_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    id_column: str | None = None,
    image_column: str | None = None,
    image_pattern: str | None = None,
    tags_column: str | None = None,
    sep: str = "|",
    attribute_columns: Sequence[str] | None = None,
    taxonomy: Sequence[str] | str | os.PathLike | None = None,
    max_rejected: float = 0.01,
    verify_images: bool = True,
    workers: int | None = None,
    join_extra_fields: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ImportResult:
    """Import a catalog CSV into the dataset directory ``out``.

    Tags come from ``tags_column`` (split on ``sep``) or from ``attribute_columns`` (each value becomes the tag
    ``column=value``), never both. The image is ``image_column``'s value, else ``image_pattern.format(id=...)``,
    relative to ``image_root``; the manifest stores it relative to ``out`` when inside it, else absolute.
    Columns not given are detected from the header (``resolve_columns``); ``log`` receives the line naming
    the columns used, before the images are checked.
    ``taxonomy`` (tags, or a taxonomy.json path) rejects rows with other tags and fixes the column order.
    Images are checked in ``workers`` processes (default: all CPUs), decoded when ``verify_images``, with a
    progress bar unless ``progress`` is false.
    ``join_extra_fields`` joins the surplus fields of a row longer than the header into its last column
    (for a last column of unquoted free text); otherwise such a row is rejected.

    Importing replaces what ``out`` held: a failed import leaves only ``rejected.csv`` (no manifest), a
    successful one removes the splits and stats of any earlier import.
    """
    start = time.perf_counter()
    src, out = Path(src_csv), Path(out)
    if not 0.0 <= max_rejected <= 1.0:
        raise ValueError(f"max_rejected must be a fraction in [0, 1], got {max_rejected}")
    if tags_column is not None and attribute_columns is not None:
        raise DatasetError(f"{src}: give tags_column or attribute_columns, not both")
    if image_column is not None and image_pattern is not None:
        raise DatasetError(f"{src}: give image_column or image_pattern, not both")
    if attribute_columns is not None and not attribute_columns:
        raise DatasetError(f"{src}: attribute_columns is empty")
    root = Path(image_root).resolve()
    if not root.is_dir():
        raise DatasetError(f"{image_root}: image root not found (images of {src})")
    if image_pattern is not None:
        _check_pattern(image_pattern)
    known = _load_taxonomy(taxonomy)

    data = _read_bytes(src)
    header, records = _parse_csv(data, src, join_extra_fields)
    cols = resolve_columns(header, src, id_column=id_column, image_column=image_column, image_pattern=image_pattern,
                           tags_column=tags_column, attribute_columns=attribute_columns)
    if log is not None:
        log(cols.describe())
    col = {name: _column(header, name, src) for name in _used_columns(cols)}
    known_set = None if known is None else frozenset(known)

    parsed: dict[int, tuple[str, list[str]]] = {}  # row -> (id, tags)
    reasons: dict[int, list[str]] = {}  # row -> its problems; rows without any are imported
    paths: dict[int, str] = {}  # row -> image path, to check
    first_row: dict[str, int] = {}
    for n, rec, problem in records:
        if problem:
            id_ = rec[col[cols.id]].strip() if col[cols.id] < len(rec) else ""
            parsed[n], reasons[n] = (id_, []), [problem]
            continue
        problems = [f"{MULTILINE}: column {c!r} (an unbalanced quote?)" for c, j in col.items() if "\n" in rec[j]]
        id_ = rec[col[cols.id]].strip()
        if not id_:
            problems.append(f"{MISSING_VALUE}: column {cols.id!r}")
        elif id_ in first_row:
            problems.append(f"{DUPLICATE_ID}: {id_!r} first seen at row {first_row[id_]}")
        else:
            first_row[id_] = n
        tags, tag_problems = _row_tags(rec, col, cols.tags, sep, cols.attributes, known_set)
        problems += tag_problems
        rel = rec[col[cols.image]].strip() if cols.image else (cols.image_pattern.format(id=id_) if id_ else "")
        if rel:
            paths[n] = os.path.normpath(os.path.join(root, rel))
        elif cols.image:
            problems.append(f"{MISSING_VALUE}: column {cols.image!r}")
        parsed[n] = (id_, tags)
        if problems:
            reasons[n] = problems

    checked = images.check_images(list(paths.values()), decode=verify_images, workers=workers, progress=progress)
    for n, why in zip(paths, checked):
        if why:
            reasons.setdefault(n, []).append(why)
    rejected = [Rejected(str(src), n, _printable(parsed[n][0]), "; ".join(reasons[n])) for n in sorted(reasons)]
    good = [n for n in parsed if n not in reasons]
    n_rows = len(records)

    frac = len(rejected) / n_rows
    if frac > max_rejected or not good:
        _remove(out, MANIFEST, TAXONOMY, SPLITS, STATS)
        write_rejected(out / REJECTED, rejected)
        raise DatasetError(
            f"{src}: {len(rejected):,} of {n_rows:,} rows rejected ({frac:.2%}, max_rejected {max_rejected:.2%}); "
            f"no dataset written; see {out / REJECTED}"
        )
    source = {
        "file": str(src.resolve()),
        "sha256": sha256_bytes(data),
        "image_root": str(root),
        "options": {
            "id_column": cols.id, "image_column": cols.image, "image_pattern": cols.image_pattern,
            "tags_column": cols.tags, "sep": sep,
            "attribute_columns": list(cols.attributes) if cols.attributes is not None else None,
            "detected_columns": list(cols.detected),
            "taxonomy": str(taxonomy) if isinstance(taxonomy, (str, os.PathLike)) else (None if known is None else "given"),
            "max_rejected": max_rejected, "verify_images": verify_images, "join_extra_fields": join_extra_fields,
        },
        "rows": n_rows,
        "imported": len(good),
        "rejected": len(rejected),
    }
    _remove(out, SPLITS, STATS)
    out_dir = str(out.resolve())
    dataset = write_dataset(
        out,
        ids=[parsed[n][0] for n in good],
        images=[_manifest_image(paths[n], out_dir) for n in good],
        tags=[parsed[n][1] for n in good],
        taxonomy=known,
        rejected=rejected,
        source=source,
    )
    return ImportResult(dataset, n_rows, len(good), rejected, time.perf_counter() - start)


def import_fashion_styles(src_dir: str | os.PathLike, out: str | os.PathLike, **kw) -> ImportResult:
    """Import the Kaggle "Fashion Product Images" layout: ``styles.csv`` + ``images/<id>.jpg``.

    Tags are ``column=value`` for the seven attribute columns (``FASHION_ATTRIBUTES``); the surplus fields of
    rows with unquoted commas belong to the last column, productDisplayName. ``kw`` go to ``import_csv``.
    """
    src = Path(src_dir)
    if not (src / "styles.csv").is_file():
        raise DatasetError(f"{src / 'styles.csv'}: not found ({src} is not a Fashion Product Images folder)")
    kw = {"attribute_columns": FASHION_ATTRIBUTES, "image_pattern": DEFAULT_IMAGE_PATTERN, "join_extra_fields": True,
          **kw}
    return import_csv(src / "styles.csv", src / "images", out, **kw)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from e


def _parse_csv(data: bytes, src: Path, join_extra_fields: bool) -> tuple[list[str], list[tuple[int, list[str], str | None]]]:
    """The header and each data row as (row number, fields, problem with its text or shape, or None).

    The file is decoded with ``surrogateescape`` so non-UTF-8 bytes spoil only the rows holding them.
    Blank lines are not rows.
    """
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        if not any(header):
            raise DatasetError(f"{src}: empty file (no header row)")
        if bad := _non_utf8(header, header):
            raise DatasetError(f"{src}: header: {bad}")
        if dup := sorted(h for h, k in Counter(header).items() if k > 1):
            raise DatasetError(f"{src}: header: duplicate column(s) {dup}")
        records = []
        for rec in filter(None, reader):
            problem = _non_utf8(rec, header)
            if problem is None and len(rec) > len(header) and join_extra_fields:
                rec = rec[: len(header) - 1] + [",".join(rec[len(header) - 1 :])]
            if problem is None and len(rec) != len(header):
                problem = f"{FIELD_COUNT}: {len(rec)} fields, the header has {len(header)}"
            records.append((len(records) + 1, rec, problem))
    except csv.Error as e:
        raise DatasetError(f"{src}: line {reader.line_num}: unreadable CSV ({e})") from e
    if not records:
        raise DatasetError(f"{src}: no data rows (header only: {','.join(header)})")
    return header, records


def _non_utf8(rec: list[str], header: list[str]) -> str | None:
    for j, value in enumerate(rec):
        if m := _UNDECODED.search(value):
            byte = m.group().encode("utf-8", "surrogateescape")[0]
            column = header[j] if j < len(header) else f"#{j + 1}"
            return f"{NON_UTF8}: byte 0x{byte:02X} in column {column!r}"
    return None


def _printable(s: str) -> str:
    """``s`` with any undecoded bytes shown as U+FFFD, so it can be written as UTF-8."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def detect_columns(header: Sequence[str]) -> dict[str, list[str]]:
    """Each role's candidate columns in ``header`` (header order): the names listed for it in ``COLUMN_NAMES``."""
    return {role: [h for h in header if _normalise(h) in names] for role, names in COLUMN_NAMES.items()}


def _normalise(name: str) -> str:
    """``name`` lower-cased, with runs of spaces and hyphens as one underscore: "Product ID" -> "product_id"."""
    return re.sub(r"[\s-]+", "_", name.strip().lower())


def resolve_columns(
    header: Sequence[str],
    src: str | os.PathLike,
    *,
    id_column: str | None = None,
    image_column: str | None = None,
    image_pattern: str | None = None,
    tags_column: str | None = None,
    attribute_columns: Sequence[str] | None = None,
) -> Columns:
    """The columns to read from ``src``: the ones given, the rest detected in ``header`` (``detect_columns``).

    The image column is detected only when neither it nor ``image_pattern`` is given; with none found the
    pattern is ``DEFAULT_IMAGE_PATTERN``. Tags are detected only when neither ``tags_column`` nor
    ``attribute_columns`` is given. Raises ``DatasetError`` naming ``src``, its header and the flag to pass
    when a role has two candidates, or when the id or tags role has none.
    """
    found = detect_columns(header)
    given = {"id": id_column is not None, "image": image_column is not None or image_pattern is not None,
             "tags": tags_column is not None or attribute_columns is not None}
    id_ = id_column if given["id"] else _only_candidate("id", found["id"], True, header, src)
    image = image_column if given["image"] else _only_candidate("image", found["image"], False, header, src)
    tags = tags_column if given["tags"] else _only_candidate("tags", found["tags"], True, header, src)
    return Columns(
        id=id_, image=image, image_pattern=None if image is not None else image_pattern or DEFAULT_IMAGE_PATTERN,
        tags=tags, attributes=tuple(attribute_columns) if attribute_columns is not None else None,
        detected=tuple(role for role, was_given in given.items() if not was_given),
    )


def _only_candidate(
    role: str, names: list[str], required: bool, header: Sequence[str], src: str | os.PathLike
) -> str | None:
    """The one candidate for ``role``, or None when there is none and it is not ``required``; else DatasetError."""
    if len(names) == 1 or not (names or required):
        return names[0] if names else None
    what = f"ambiguous {role} column (candidates: {', '.join(names)})" if names else f"no {role} column found"
    raise DatasetError(f"{src}: {what}; the header has: {', '.join(header)}; pass {_FLAGS[role]}")


def _used_columns(cols: Columns) -> list[str]:
    names = [cols.id, cols.image, cols.tags, *(cols.attributes or ())]
    return list(dict.fromkeys(c for c in names if c is not None))


def _column(header: list[str], name: str, src: Path) -> int:
    if name not in header:
        raise DatasetError(f"{src}: header: missing column {name!r} (the header has: {', '.join(header)})")
    return header.index(name)


def _row_tags(
    rec: list[str],
    col: dict[str, int],
    tags_column: str | None,
    sep: str,
    attribute_columns: Sequence[str] | None,
    known: frozenset[str] | None,
) -> tuple[list[str], list[str]]:
    """A row's tags and the problems with them."""
    problems = []
    if tags_column is not None:
        tags = list(dict.fromkeys(t.strip() for t in rec[col[tags_column]].split(sep) if t.strip()))
        if not tags:
            problems.append(f"{EMPTY_TAGS}: column {tags_column!r}")
    else:
        tags = []
        for c in attribute_columns or ():
            value = rec[col[c]].strip()
            if value:
                tags.append(f"{c}={value}")
            else:
                problems.append(f"{MISSING_VALUE}: column {c!r}")
    if bad := [t for t in tags if TAG_SEP in t]:
        problems.append(f"{BAD_TAG}: {bad} contain {TAG_SEP!r}, the manifest's tag separator")
    if known is not None and (unknown := [t for t in tags if t not in known]):
        problems.append(f"{UNKNOWN_TAG}: {unknown} not in the taxonomy")
    return tags, problems


def _load_taxonomy(taxonomy: Sequence[str] | str | os.PathLike | None) -> list[str] | None:
    """The tag list given directly or in a taxonomy.json (``{"tags": [...]}`` or a bare list)."""
    if taxonomy is None:
        return None
    where = "taxonomy"
    if isinstance(taxonomy, (str, os.PathLike)):
        where = str(taxonomy)
        try:
            obj = read_json(taxonomy)
        except (OSError, json.JSONDecodeError) as e:
            raise DatasetError(f"{where}: cannot read the taxonomy ({e})") from e
        taxonomy = obj.get("tags") if isinstance(obj, dict) else obj
    tags = list(taxonomy) if isinstance(taxonomy, (list, tuple)) else None
    if not tags or not all(isinstance(t, str) and t for t in tags):
        raise DatasetError(f"{where}: must be a non-empty list of tag strings")
    if dup := sorted(t for t, k in Counter(tags).items() if k > 1):
        raise DatasetError(f"{where}: duplicate tags {dup}")
    return tags


def _check_pattern(pattern: str) -> None:
    try:
        pattern.format(id="0")
    except (KeyError, IndexError, ValueError) as e:
        raise DatasetError(f"image_pattern {pattern!r}: only the field {{id}} is available ({type(e).__name__}: {e})") from e


def _manifest_image(path: str, out_dir: str) -> str:
    """``path`` (absolute, normalised) relative to the dataset directory ``out_dir`` when inside it, else as is."""
    inside = path.startswith(os.path.join(out_dir, ""))
    return Path(os.path.relpath(path, out_dir)).as_posix() if inside else path


def _remove(root: Path, *names: str) -> None:
    for name in names:
        (root / name).unlink(missing_ok=True)
