"""The synthetic catalog: taxonomy sizes, long-tail sampler, determinism, and tags visible in the pixels."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bakeoff.common.io import read_json
from bakeoff.train.data import synth
from bakeoff.train.data.dataset import field_of, load_dataset

COL = {name: j for j, name in enumerate(synth.FIELD_NAMES)}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("n_tags", [16, 17, 40, 250, 251, 600])
def test_taxonomy_sums_to_n_tags(n_tags):
    tax = synth.taxonomy(n_tags)
    assert list(tax) == list(synth.FIELD_NAMES)
    assert sum(len(v) for v in tax.values()) == n_tags
    assert all(len(v) >= synth.MIN_VALUES_PER_FIELD for v in tax.values())
    names = synth.tag_names(tax)
    assert len(set(names)) == n_tags and all(field_of(t) in tax for t in names)


def test_taxonomy_rejects_sizes_it_cannot_fill():
    with pytest.raises(ValueError, match="n_tags=15"):
        synth.taxonomy(15)
    with pytest.raises(ValueError, match="capacity"):
        synth.taxonomy(sum(len(f.values) for f in synth.FIELDS) + 1)


def test_sampler_long_tail_at_80k():
    """At 80,000 images with ~75% in train, about a third of the 250 tags have under 50 training images."""
    codes = synth.sample_tags(80_000, np.random.default_rng(0), n_tags=250)
    counts = {}
    for name, values in synth.taxonomy(250).items():
        col = codes[:, COL[name]]
        counts[name] = np.bincount(col[col >= 0], minlength=len(values))
    train = np.concatenate(list(counts.values())) * 0.75
    assert 0.28 <= (train < 50).mean() <= 0.40
    assert train.min() >= 5  # rare, not absent
    assert sum((c * 0.75 < 50).sum() for n, c in counts.items() if n != "brand") >= 5  # the tail is not only brands
    assert (codes[:, COL["category"]] >= 0).all()  # every image has at least one tag


def test_sampler_min_count_tops_up_rare_tags():
    tax = synth.taxonomy(250)
    codes = synth.sample_tags(3000, np.random.default_rng(1), n_tags=250, min_count=3)
    for name, values in tax.items():
        col = codes[:, COL[name]]
        assert np.bincount(col[col >= 0], minlength=len(values)).min() >= 3, name


def test_generate_is_deterministic_and_seed_dependent(tmp_path):
    a = synth.generate(tmp_path / "a", n_images=24, n_tags=40, seed=3, workers=1)
    b = synth.generate(tmp_path / "b", n_images=24, n_tags=40, seed=3, workers=2)
    c = synth.generate(tmp_path / "c", n_images=24, n_tags=40, seed=4, workers=1)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb  # byte-identical manifest, taxonomy and images, whatever the worker count
    assert fa["manifest.csv"] != fc["manifest.csv"]
    assert sum(fa[k] != fc[k] for k in fa if k.startswith("images/")) == 24
    assert a.tags == b.tags and a.tags != c.tags


def test_generate_writes_a_loadable_dataset(tmp_path):
    (tmp_path / "splits.json").write_text("{}")  # left by an earlier dataset in the same directory
    ds = synth.generate(tmp_path, n_images=30, n_tags=60, seed=0, image_size=48, workers=1)
    back = load_dataset(tmp_path)
    assert back.ids == ds.ids and back.tags == ds.tags and len(back.taxonomy) == 60
    assert all(back.image_path(i).is_file() and not back.images[i].startswith("/") for i in range(len(back)))
    assert back.labels().sum(1).min() >= 1
    assert back.splits is None
    with Image.open(back.image_path(0)) as im:
        assert im.size == (48, 48) and im.mode == "RGB"
    source = read_json(tmp_path / "taxonomy.json")["source"]
    assert source["generator"] == "bakeoff.train.data.synth" and source["seed"] == 0 and source["n_images"] == 30
    assert sum(source["fields"].values()) == 60


def test_generate_rejects_tiny_images(tmp_path):
    with pytest.raises(ValueError, match="image_size=16"):
        synth.generate(tmp_path, n_images=2, image_size=16)


def test_glyphs_are_distinct_symmetric_marks():
    g = synth.glyphs(300)
    assert (g == g[:, :, ::-1]).all()
    flat = g.reshape(len(g), -1)
    dist = (flat[:, None] != flat[None]).sum(-1)
    assert dist[~np.eye(len(g), dtype=bool)].min() >= 4
    assert (synth.glyphs(10) == g[:10]).all()  # brand i keeps its mark whatever the taxonomy size


def _variants(render, field, base):
    """One image per value of ``field`` (plus 'absent' for optional fields), everything else held fixed."""
    out = []
    for v in range(-1, len(render.tax[field])):
        if v < 0 and field in ("category", "colour"):
            continue
        codes = base.copy()
        codes[COL[field]] = v
        out.append(render(codes, synth.image_rng(11, 0)).astype(np.int16))
    return np.stack(out)


@pytest.mark.parametrize("field", synth.FIELD_NAMES)
@pytest.mark.parametrize("category, colour", [("t-shirt", "blue"), ("bottle", "black"), ("box", "white")])
def test_every_tag_changes_the_pixels(field, category, colour):
    """Any two values of a field (rare ones included) differ in a visible patch of pixels, on dark and light fills."""
    render = synth.Renderer(n_tags=250, image_size=64)
    base = np.full(len(COL), -1, dtype=np.int16)
    base[COL["category"]] = render.tax["category"].index(category)
    base[COL["colour"]] = render.tax["colour"].index(colour)
    imgs = _variants(render, field, base)
    imgs = imgs[:, (imgs != imgs[0]).any(-1).any(0)]  # pixels some variant changes
    for i in range(len(imgs) - 1):
        changed = (np.abs(imgs[i + 1:] - imgs[i]).max(-1) > 16).sum(1)
        assert changed.min() >= 8, (field, i, i + 1 + changed.argmin(), changed.min())


def test_colour_tag_sets_mean_colour():
    render = synth.Renderer(n_tags=250, image_size=64)
    codes = synth.sample_tags(1, np.random.default_rng(2), n_tags=250)[0]
    codes[COL["pattern"]] = -1
    means = {}
    for name in ("red", "blue", "green"):
        codes[COL["colour"]] = render.tax["colour"].index(name)
        means[name] = render(codes, synth.image_rng(0, 5)).reshape(-1, 3).mean(0)
    assert means["red"][0] > means["blue"][0] + 10 and means["red"][0] > means["green"][0] + 10
    assert means["blue"][2] > means["red"][2] + 10 and means["green"][1] > means["red"][1] + 10


def test_colour_is_learnable_by_nearest_centroid():
    """Centre-crop mean colour alone names 12 colours far above chance, despite pose, pattern and lighting."""
    render = synth.Renderer(n_tags=250, image_size=64)
    n, k = 320, 12
    codes = synth.sample_tags(n, np.random.default_rng(0), n_tags=250)
    codes[:, COL["colour"]] = np.arange(n) % k
    feats = np.stack([render(c, synth.image_rng(1, i))[16:48, 16:48].reshape(-1, 3).mean(0) for i, c in enumerate(codes)])
    y = codes[:, COL["colour"]]
    fit = np.arange(n) < n // 2
    centroids = np.stack([feats[fit & (y == c)].mean(0) for c in range(k)])
    pred = ((feats[~fit, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == y[~fit]).mean() > 4 / k  # chance is 1/k


def _marked(render: synth.Renderer, field: str) -> np.ndarray:
    """Pixels that a value of ``field`` changes on a plain first-category, first-colour product."""
    base = np.full(len(COL), -1, dtype=np.int16)
    base[COL["category"]] = base[COL["colour"]] = 0
    marked = base.copy()
    marked[COL[field]] = 0
    a, b = (render(c, synth.image_rng(0, 1)).astype(np.int16) for c in (base, marked))
    return np.abs(a - b).max(-1) > 16


@pytest.mark.parametrize("field", ["brand", "size"])
def test_detail_draws_the_fine_marks_smaller(field):
    """detail 4 draws the brand badge and the size sticker 4x smaller: about 1/16 of the pixels."""
    coarse, fine = (_marked(synth.Renderer(n_tags=30, image_size=128, detail=d), field).sum() for d in (1, 4))
    assert 8 <= coarse / fine <= 32, (coarse, fine)


@pytest.mark.parametrize("kind", ["stripes", "checks", "dots", "grid"])
def test_detail_draws_patterns_finer(kind):
    """A pattern drawn 4x finer changes 4x as often along a line through the product."""
    y = np.linspace(-1, 1, 20_000, dtype=np.float32)[None, :]
    x = np.full_like(y, 0.13)

    def changes(detail: float) -> int:
        return int(np.abs(np.diff(synth._pattern(kind, x, y, np.random.default_rng(0), 64, detail))).sum())

    assert changes(4) == pytest.approx(4 * changes(1), abs=2)


def test_detail_is_checked_and_recorded(tmp_path):
    with pytest.raises(ValueError, match="detail"):
        synth.Renderer(n_tags=30, image_size=64, detail=3)  # marks under a pixel
    with pytest.raises(ValueError, match="detail"):
        synth.generate(tmp_path, n_images=2, n_tags=30, image_size=64, detail=0.5, workers=1)
    synth.generate(tmp_path, n_images=4, n_tags=30, image_size=64, detail=2, workers=1)
    assert read_json(tmp_path / "taxonomy.json")["source"]["detail"] == 2
