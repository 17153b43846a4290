"""Catalog importers: good rows import, every bad row lands in rejected.csv with its reason."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from bakeoff.common.io import read_json, sha256_file
from bakeoff.train.data import images
from bakeoff.train.data.dataset import MANIFEST, REJECTED, SPLITS, STATS, DatasetError, load_dataset, read_rejected
from bakeoff.train.data.importers import detect_columns, import_csv, import_fashion_styles, resolve_columns

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
FASHION = SHARED / "data" / "fashion-product-images-small"
TAXONOMY = ["top", "bottom", "blue", "acc", "size,large"]


def _image(path: Path, fmt: str = "JPEG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise((24, 16), 64).convert("RGB").save(path, fmt)
    return path.read_bytes()


def _csv(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


def _catalog(tmp: Path, rows: list[list[str]], raw: bytes = b"") -> tuple[Path, Path]:
    """A catalog CSV (header id,name,tags, then ``rows``, then ``raw`` bytes) and its image folder."""
    (tmp / "img").mkdir(parents=True, exist_ok=True)
    src = tmp / "catalog.csv"
    src.write_bytes(_csv([["id", "name", "tags"], *rows]) + raw)
    return src, tmp / "img"


# row -> (id, reason kind, a detail the reason must name); rows 1-3 are good
BAD_ROWS = {
    4: ("1", "duplicate id", "first seen at row 1"),
    5: ("", "missing value", "'id'"),
    6: ("6", "image file missing", "6.jpg"),
    7: ("7", "zero-byte image file", "7.jpg"),
    8: ("8", "truncated image", "8.jpg"),
    9: ("9", "undecodable image", "9.jpg"),
    10: ("10", "truncated image", "10.jpg"),
    11: ("11", "unknown tag", "purple"),
    12: ("12", "empty tag list", "'tags'"),
    13: ("13", "multi-line value", "'tags'"),
    14: ("14", "non-UTF-8 text", "0xE9 in column 'name'"),
    15: ("15", "wrong field count", "2 fields, the header has 3"),
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One import of a catalog with three good rows and one row per kind of problem."""
    tmp = tmp_path_factory.mktemp("mixed")
    src, img = _catalog(
        tmp,
        [
            ["1", "Shirt, blue", "top|blue"],
            ["2", 'Jeans "slim"', " bottom | blue | bottom "],
            ["3", "Hat", "acc|size,large"],
            ["1", "Duplicate", "top"],
            ["", "No id", "top"],
            ["6", "No image", "top"],
            ["7", "Empty image", "top"],
            ["8", "Half a JPEG", "top"],
            ["9", "Garbage", "top"],
            ["10", "PNG without its end", "top"],
            ["11", "Unknown tag", "top|purple"],
            ["12", "No tags", " | "],
            ["13", "Stray quote", "top\n14,x,top"],
        ],
        raw=b"14,caf\xe9,top\n\n15,short\n",
    )
    for i in (1, 2, 3):
        _image(img / f"{i}.jpg")
    (img / "7.jpg").write_bytes(b"")
    jpeg = _image(img / "8.jpg")
    (img / "8.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (img / "9.jpg").write_bytes(b"\x00garbage, not an image" * 10)
    png = _image(img / "10.jpg", "PNG")
    (img / "10.jpg").write_bytes(png[:-10])  # pixels intact, end chunk cut: only verify() sees it
    for i in (11, 12, 13, 14, 15):
        _image(img / f"{i}.jpg")
    result = import_csv(src, img, tmp / "ds", tags_column="tags", taxonomy=TAXONOMY, max_rejected=1.0, workers=2)
    return result, src, img


def test_good_rows_import(mixed):
    result, src, img = mixed
    ds = load_dataset(result.dataset.root)
    assert ds.ids == ["1", "2", "3"]
    assert ds.tags == [["top", "blue"], ["bottom", "blue"], ["acc", "size,large"]]
    assert ds.taxonomy == TAXONOMY
    assert [ds.image_path(i) for i in range(3)] == [img.resolve() / f"{i}.jpg" for i in (1, 2, 3)]
    assert (result.n_rows, result.n_imported, len(result.rejected)) == (15, 3, 12)
    source = read_json(ds.root / "taxonomy.json")["source"]
    assert source["sha256"] == sha256_file(src)
    assert source["options"]["tags_column"] == "tags"


@pytest.mark.parametrize("row", sorted(BAD_ROWS))
def test_bad_row_rejected_with_reason(mixed, row):
    result, src, _ = mixed
    id_, kind, detail = BAD_ROWS[row]
    written = {r.row: r for r in read_rejected(result.dataset.root)}
    assert written == {r.row: r for r in result.rejected}
    r = written[row]
    assert (r.source, r.id) == (str(src), id_)
    assert r.reason.startswith(kind + ":") and detail in r.reason


def test_non_utf8_id_is_reported_readably(tmp_path):
    src, img = _catalog(tmp_path, [["1", "ok", "top"]], raw=b"2\xff,bad,top\n")
    _image(img / "1.jpg")
    result = import_csv(src, img, tmp_path / "ds", tags_column="tags", max_rejected=0.5)
    assert [(r.row, r.id) for r in read_rejected(tmp_path / "ds")] == [(2, "2\ufffd")]
    assert "non-UTF-8 text: byte 0xFF in column 'id'" in result.rejected[0].reason


def test_attribute_columns_become_field_tags(tmp_path):
    (tmp_path / "cat.csv").write_bytes(_csv([
        ["sku", "photo", "colour", "kind"],
        ["a", "pics/a.png", "Navy Blue", "Shirt"],
        ["b", "pics/b.png", "", "Shirt"],
    ]))
    out = tmp_path / "ds"
    _image(out / "pics" / "a.png", "PNG")
    _image(out / "pics" / "b.png", "PNG")
    result = import_csv(tmp_path / "cat.csv", out, out, id_column="sku", image_column="photo",
                        attribute_columns=["colour", "kind"], max_rejected=0.5)
    ds = load_dataset(out)
    assert ds.tags == [["colour=Navy Blue", "kind=Shirt"]]
    assert ds.images == ["pics/a.png"]  # inside the dataset directory: stored relative to it
    assert ds.fields == {"colour=Navy Blue": "colour", "kind=Shirt": "kind"}
    assert result.rejected[0].reason == "missing value: column 'colour'"


def test_taxonomy_from_json_file(tmp_path):
    src, img = _catalog(tmp_path, [["1", "a", "blue|top"]])
    _image(img / "1.jpg")
    (tmp_path / "tax.json").write_text(json.dumps({"tags": ["top", "blue", "unused"]}))
    result = import_csv(src, img, tmp_path / "ds", tags_column="tags", taxonomy=tmp_path / "tax.json")
    assert result.dataset.taxonomy == ["top", "blue", "unused"]
    assert result.dataset.labels().tolist() == [[1, 1, 0]]


def test_extra_fields_are_rejected_or_joined_into_the_last_column(tmp_path):
    (tmp_path / "styles.csv").write_text("id,colour,name\n1,Blue,Boss Perfume, Balm and Gel Set\n2,Red,Cap\n")
    for i in (1, 2):
        _image(tmp_path / "images" / f"{i}.jpg")
    common = dict(attribute_columns=["colour"], max_rejected=0.5)
    rejected = import_csv(tmp_path / "styles.csv", tmp_path / "images", tmp_path / "a", **common).rejected
    assert [(r.row, r.reason) for r in rejected] == [(1, "wrong field count: 4 fields, the header has 3")]
    joined = import_fashion_styles(tmp_path, tmp_path / "b", **common)
    assert (joined.n_imported, joined.rejected) == (2, [])


def test_verify_images_off_still_checks_files(tmp_path):
    src, img = _catalog(tmp_path, [["1", "a", "top"], ["2", "b", "top"], ["3", "c", "top"]])
    (img / "1.jpg").write_bytes(b"not an image")
    (img / "2.jpg").write_bytes(b"")
    result = import_csv(src, img, tmp_path / "ds", tags_column="tags", verify_images=False, max_rejected=1.0, workers=1)
    assert result.dataset.ids == ["1"]
    assert [r.reason.split(":")[0] for r in result.rejected] == ["zero-byte image file", "image file missing"]


def test_too_many_rejected_fails_without_a_manifest(tmp_path):
    src, img = _catalog(tmp_path, [["1", "a", "top"], ["2", "b", "top"]])
    _image(img / "1.jpg")
    out = tmp_path / "ds"
    import_csv(src, img, out, tags_column="tags", max_rejected=0.5)  # an earlier, accepted import
    (out / SPLITS).write_text("{}")
    with pytest.raises(DatasetError) as e:
        import_csv(src, img, out, tags_column="tags", max_rejected=0.25)
    msg = str(e.value)
    assert "1 of 2 rows rejected (50.00%, max_rejected 25.00%)" in msg and str(out / REJECTED) in msg
    assert not (out / MANIFEST).exists() and not (out / SPLITS).exists()
    assert [r.id for r in read_rejected(out)] == ["2"]


def test_reimport_drops_stale_splits_and_stats(tmp_path):
    src, img = _catalog(tmp_path, [["1", "a", "top"]])
    _image(img / "1.jpg")
    out = tmp_path / "ds"
    import_csv(src, img, out, tags_column="tags")
    (out / SPLITS).write_text("{}")
    (out / STATS).write_text("{}")
    import_csv(src, img, out, tags_column="tags")
    assert not (out / SPLITS).exists() and not (out / STATS).exists()


def test_summary_counts_reasons_by_kind(mixed):
    text = mixed[0].summary()
    assert "imported 3 of 15 rows" in text and "(5 tags)" in text
    assert "rejected 12 rows (80.00%)" in text
    assert "      2  truncated image" in text and "      1  duplicate id" in text


@pytest.mark.parametrize(
    "rows, kw, message",
    [
        ([["1", "a", "top"]], {"tags_column": "labels"}, "missing column 'labels' (the header has: id, name, tags)"),
        ([["1", "a", "top"]], {"tags_column": "tags", "id_column": "sku"}, "missing column 'sku'"),
        ([], {"tags_column": "tags"}, "no data rows (header only: id,name,tags)"),
        ([["1", "a", "top"]], {"tags_column": "tags", "attribute_columns": ["name"]}, "give tags_column or attribute_columns"),
        ([["1", "a", "top"]], {"image_column": "name", "image_pattern": "{id}.png"},
         "give image_column or image_pattern"),
        ([["1", "a", "top"]], {"tags_column": "tags", "image_pattern": "{sku}.jpg"}, "only the field {id}"),
        ([["1", "a", "top"]], {"tags_column": "tags", "taxonomy": ["top", "top"]}, "duplicate tags ['top']"),
    ],
)
def test_structural_errors_fail_at_once(tmp_path, rows, kw, message):
    src, img = _catalog(tmp_path, rows)
    with pytest.raises(DatasetError) as e:
        import_csv(src, img, tmp_path / "ds", **kw)
    assert message in str(e.value)
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    "header, second, files, picked",
    [
        (["id", "image", "tags"], ["a/1.png", "a/2.png"], ["a/1.png", "a/2.png"],
         "columns: id 'id' (detected), image 'image' (detected), tags 'tags' (detected)"),
        (["ID", "Path", "Labels"], ["a/1.png", "a/2.png"], ["a/1.png", "a/2.png"],
         "columns: id 'ID' (detected), image 'Path' (detected), tags 'Labels' (detected)"),
        (["Product ID", "title", "TAGS"], ["Shirt", "Jeans"], ["1.jpg", "2.jpg"],  # no image column: <id>.jpg
         "columns: id 'Product ID' (detected), image pattern '{id}.jpg' (no image column found), "
         "tags 'TAGS' (detected)"),
    ],
)
def test_obvious_columns_are_detected_without_flags(tmp_path, header, second, files, picked):
    src, img = tmp_path / "catalog.csv", tmp_path / "img"
    src.write_bytes(_csv([header, ["1", second[0], "top|blue"], ["2", second[1], "top"]]))
    for name in files:
        _image(img / name)
    logged = []
    result = import_csv(src, img, tmp_path / "ds", log=logged.append, progress=False)
    assert logged == [picked]
    assert (result.dataset.ids, result.dataset.tags) == (["1", "2"], [["top", "blue"], ["top"]])
    assert [result.dataset.image_path(i) for i in (0, 1)] == [(img / name).resolve() for name in files]
    options = read_json(tmp_path / "ds" / "taxonomy.json")["source"]["options"]
    assert options["detected_columns"] == ["id", "image", "tags"]
    assert (options["id_column"], options["tags_column"]) == (header[0], header[2])


@pytest.mark.parametrize(
    "header, message",
    [
        (["id", "image", "path", "tags"], "ambiguous image column (candidates: image, path); "
         "the header has: id, image, path, tags; pass --image-column NAME or --image-pattern PATTERN"),
        (["sku", "ID", "tags"], "ambiguous id column (candidates: sku, ID); the header has: sku, ID, tags; "
         "pass --id-column NAME"),
        (["id", "name", "colour"], "no tags column found; the header has: id, name, colour; pass --tags-column NAME or "
                                   "--attribute-columns A,B"),
        (["name", "tags"], "no id column found; the header has: name, tags; pass --id-column NAME"),
    ],
)
def test_ambiguous_or_missing_columns_fail_naming_file_header_and_flag(tmp_path, header, message):
    src, img = tmp_path / "catalog.csv", tmp_path / "img"
    img.mkdir()
    src.write_bytes(_csv([header, ["1"] * len(header)]))
    with pytest.raises(DatasetError) as e:
        import_csv(src, img, tmp_path / "ds")
    assert f"{src}: {message}" in str(e.value)
    assert not (tmp_path / "ds").exists()


def test_explicit_flags_override_detection(tmp_path):
    header = ["id", "sku", "image", "path", "tags", "labels"]
    src, img = tmp_path / "catalog.csv", tmp_path / "img"
    src.write_bytes(_csv([header, ["1", "s1", "missing.jpg", "p/1.jpg", "nope", "top"]]))
    _image(img / "p" / "1.jpg")
    logged = []
    result = import_csv(src, img, tmp_path / "ds", id_column="sku", image_column="path", tags_column="labels",
                        log=logged.append, progress=False)
    assert (result.dataset.ids, result.dataset.tags) == (["s1"], [["top"]])
    assert result.dataset.image_path(0) == (img / "p" / "1.jpg").resolve()
    assert logged == ["columns: id 'sku', image 'path', tags 'labels'"]
    # an explicit pattern replaces the image column; attribute columns replace the tags column
    _image(img / "s1.png")
    result = import_csv(src, img, tmp_path / "ds", id_column="sku", image_pattern="{id}.png",
                        attribute_columns=["tags"], log=logged.append, progress=False)
    assert result.dataset.image_path(0) == (img / "s1.png").resolve() and result.dataset.tags == [["tags=nope"]]
    assert logged[-1] == "columns: id 'sku', image pattern '{id}.png', attribute tags 'tags'"


def test_detect_columns_and_resolve_columns_are_pure():
    header = ["Product-ID", "Image Path", "labels", "name", "img"]
    assert detect_columns(header) == {"id": ["Product-ID"], "image": ["Image Path", "img"], "tags": ["labels"]}
    cols = resolve_columns(header, "c.csv", image_column="img")
    assert (cols.id, cols.image, cols.image_pattern, cols.tags, cols.detected) == (
        "Product-ID", "img", None, "labels", ("id", "tags"))


def test_empty_file_and_missing_image_root(tmp_path):
    src, img = _catalog(tmp_path, [["1", "a", "top"]])
    with pytest.raises(DatasetError, match="image root not found"):
        import_csv(src, tmp_path / "nowhere", tmp_path / "ds", tags_column="tags")
    src.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"catalog\.csv: empty file"):
        import_csv(src, img, tmp_path / "ds", tags_column="tags")


def test_check_images_in_parallel_keeps_order(tmp_path):
    good = str(tmp_path / "a.png")
    _image(Path(good), "PNG")
    paths = [good, str(tmp_path / "missing.png")] * 3
    assert images.check_images(paths, workers=2) == images.check_images(paths, workers=1)
    assert images.check_images(paths, workers=2)[:2] == [None, f"image file missing: {paths[1]}"]


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"needs the shared fashion catalog at {FASHION}")
def test_real_fashion_catalog(tmp_path):
    result = import_fashion_styles(FASHION, tmp_path / "fashion")
    ds = load_dataset(tmp_path / "fashion")
    assert (result.n_rows, len(ds), len(ds.taxonomy), len(result.rejected)) == (44_446, 44_072, 256, 374)
    assert all("image file missing" in r.reason for r in read_rejected(ds.root))
    assert all(len(t) == 7 for t in ds.tags)
    assert ds.image_path(0).is_file()
