"""The report's five figures (matplotlib, Agg canvas, Okabe-Ito colour-blind-safe palette), from plain data.

Colour is the backbone family wherever a figure shows pairs by backbone (Figures 1-3); in scatter plots the marker
is the runtime and precision and a hollow marker is the linear probe (filled: fine-tune). Training phases
(Figure 4) are greys and hatches, and runtimes in Figure 5 colours no backbone uses, so no colour means two
things. Rows carry ``random_init``: random-init pairs and backbones are labelled so in every legend and axis.
Each function writes one PNG.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from bakeoff.reports.artifacts import FAMILY_LABELS, RANDOM_INIT
from bakeoff.reports.fmt import ms, seconds_unit

OKABE_ITO = {"orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73", "yellow": "#F0E442", "blue": "#0072B2",
             "vermillion": "#D55E00", "purple": "#CC79A7", "black": "#000000"}
FAMILY_COLOURS = {"cnn": OKABE_ITO["blue"], "dinov2": OKABE_ITO["vermillion"], "clip": OKABE_ITO["green"]}
SPARE_COLOURS = [OKABE_ITO[k] for k in ("purple", "orange", "sky", "black")]
MARKERS = ("o", "s", "D", "^", "v", "P", "h", "X")  # one per measured runtime + precision, in label order
ESTIMATE_MARKER = "*"
DPI = 110
STRATEGY_TITLES = {"probe": "linear probe", "ft": "fine-tune (last 4 blocks)"}


def family_colour(family: str) -> str:
    return FAMILY_COLOURS.get(family, SPARE_COLOURS[sum(map(ord, family)) % len(SPARE_COLOURS)])


def pair_tick(row: dict) -> str:
    """A pair's axis label: its name, marked when its weights are random."""
    return row["pair"] + (RANDOM_INIT if row["random_init"] else "")


def family_labels(rows: list[dict]) -> dict[str, str]:
    """Legend label per backbone family: ``CLIP (random init)`` when all its pairs are random-init,
    ``CNN (cnn-probe random init)`` when some are."""
    out = {}
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = list(dict.fromkeys((r["pair"], r["random_init"]) for r in rows if r["family"] == family))
        random = [pair for pair, rnd in mine if rnd]
        label = FAMILY_LABELS.get(family, family)
        out[family] = (label + RANDOM_INIT if len(random) == len(mine)
                       else f"{label} ({', '.join(random)} random init)" if random else label)
    return out


def _figure(width: float, height: float, ncols: int = 1, **kw) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False, **kw)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.set_axisbelow(True)
    return fig, list(axes)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _marker_style(family: str, strategy: str) -> dict:
    colour = family_colour(family)
    return {"color": colour, "markeredgecolor": colour, "markerfacecolor": "white" if strategy == "probe" else colour}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x, higher y), in increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plotted(points: list[dict]) -> list[dict]:
    """Figure 1's drawn points: all but those whose runtime's evaluation failed (they have no accuracy)."""
    return [p for p in points if p["accuracy"] != "failed"]


def pareto_points(points: list[dict]) -> list[dict]:
    """Figure 1's Pareto front, in increasing latency: among the drawn points that were measured (not T4
    ESTIMATES) on a runtime whose export did not fail parity, those no other beats on both p99 latency and
    macro-F1."""
    measured = [p for p in plotted(points) if not p["estimate"] and not p["parity_failed"]]
    return [measured[i] for i in pareto_front([(p["latency_ms"], p["macro_f1"]) for p in measured])]


def front_key(front: list[dict]) -> list[str]:
    """Figure 1's legend lines for the numbered Pareto-front points:
    ``1  cnn-ft · ONNX Runtime fp32: 2.35 ms, 0.477``."""
    return [f"{k}  {pair_tick(p)} · {p['label']}: {ms(p['latency_ms'])} ms, {p['macro_f1']:.3f}"
            for k, p in enumerate(front, 1)]


def latency_accuracy(points: list[dict], path: Path) -> Path:
    """Figure 1: macro-F1 against p99 latency at batch 1, one point per (pair, runtime); the Pareto front of the
    measured points. ``points``: pair, family, strategy, random_init, runtime, label, latency_ms, macro_f1,
    estimate, parity_failed (its export failed parity: crossed out, off the front), accuracy ("own": the
    runtime's evaluation, "pytorch": not evaluated there, drawn faded; "failed": not drawn).

    Front points are numbered just above and left of themselves, where no measured point can be (a point there
    would beat them on both axes), and listed in the legend."""
    fig, (ax,) = _figure(10.5, 5.8)
    drawn = plotted(points)
    runtimes = sorted({p["label"] for p in drawn if not p["estimate"]})
    markers = {label: MARKERS[i % len(MARKERS)] for i, label in enumerate(runtimes)}
    for p in drawn:
        marker = ESTIMATE_MARKER if p["estimate"] else markers[p["label"]]
        ax.plot(p["latency_ms"], p["macro_f1"], linestyle="none", marker=marker, markersize=13 if p["estimate"] else 9,
                markeredgewidth=1.6, alpha=0.9 if p["accuracy"] == "own" else 0.35,
                **_marker_style(p["family"], p["strategy"]))
        if p["parity_failed"]:
            ax.plot(p["latency_ms"], p["macro_f1"], linestyle="none", marker="x", markersize=12, color="black")
    front = pareto_points(points)
    if front:
        xs = [p["latency_ms"] for p in front]
        ys = [p["macro_f1"] for p in front]
        ax.plot(xs, ys, drawstyle="steps-post", color="black", linestyle="--", linewidth=1.2, zorder=0)
        for k, p in enumerate(front, 1):
            ax.annotate(str(k), (p["latency_ms"], p["macro_f1"]), xytext=(-11, 11), textcoords="offset points",
                        ha="center", va="center", fontsize=8, fontweight="bold",
                        bbox={"boxstyle": "circle,pad=0.2", "facecolor": "white", "edgecolor": "black",
                              "linewidth": 0.6},
                        arrowprops={"arrowstyle": "-", "linewidth": 0.6, "color": "black", "shrinkA": 0, "shrinkB": 5})
        ax.margins(y=0.08)
    lat = [p["latency_ms"] for p in drawn]
    if lat and max(lat) / min(lat) > 20:
        ax.set_xscale("log")
        ax.set_xlabel("p99 latency at batch 1 (ms, log scale)")
    else:
        ax.set_xlabel("p99 latency at batch 1 (ms)")
    ax.set_ylabel("test macro-F1")
    ax.set_title("Accuracy vs latency (dashed: Pareto front of measured points)")
    labels = family_labels(drawn)
    families = sorted(labels, key=lambda f: list(FAMILY_COLOURS).index(f) if f in FAMILY_COLOURS else 99)
    handles = [Patch(color=family_colour(f), label=labels[f]) for f in families]
    handles += [Line2D([], [], linestyle="none", marker=markers[r], color="grey", label=r) for r in runtimes]
    if any(p["estimate"] for p in drawn):
        handles.append(Line2D([], [], linestyle="none", marker=ESTIMATE_MARKER, markersize=11, color="grey",
                              label="T4 ESTIMATE (not measured)"))
    if any(p["accuracy"] == "pytorch" for p in drawn):
        handles.append(Line2D([], [], linestyle="none", marker="o", color="grey", alpha=0.35,
                              label="faded: accuracy not measured\non this runtime (PyTorch fp32)"))
    if any(p["parity_failed"] for p in drawn):
        handles.append(Line2D([], [], linestyle="none", marker="x", markersize=10, color="black",
                              label="export FAILED parity\n(not on the front)"))
    handles += [Line2D([], [], linestyle="none", marker="o", color="grey", markerfacecolor="white",
                       label="linear probe"),
                Line2D([], [], linestyle="none", marker="o", color="grey", label="fine-tune")]
    if front:
        handles += [Line2D([], [], linestyle="none", label=text)
                    for text in ["", "Pareto front (dashed), by number:", *front_key(front)]]
    fig.legend(handles=handles, fontsize=9, loc="outside right upper", frameon=False)
    return _save(fig, path)


def bucket_bars(rows: list[dict], buckets: list[tuple[str, str]], path: Path) -> Path:
    """Figure 2: macro-F1 per frequency bucket, one bar per pair with its 95% CI whisker (clipped at the bar
    when an interval excludes its point). ``rows``: pair, family, strategy, random_init,
    values {bucket: (value, lo, hi) or None}; ``buckets``: (key, title)."""
    fig, axes = _figure(12, 4.6, ncols=len(buckets), sharey=True)
    x = np.arange(len(rows))
    for ax, (bucket, title) in zip(axes, buckets):
        for i, r in enumerate(rows):
            v = r["values"].get(bucket)
            if v is None or v[0] is None:
                continue
            colour = family_colour(r["family"])
            probe = r["strategy"] == "probe"
            ax.bar(i, v[0], color="white" if probe else colour, edgecolor=colour, hatch="///" if probe else None,
                   linewidth=1.4)
            if v[1] is not None:
                ax.errorbar(i, v[0], yerr=[[max(v[0] - v[1], 0.0)], [max(v[2] - v[0], 0.0)]], color="black",
                            capsize=4, linewidth=1.2)
        if not any(r["values"].get(bucket) and r["values"][bucket][0] is not None for r in rows):
            ax.text(0.5, 0.5, "no tag in this bucket", transform=ax.transAxes, ha="center", color="grey")
        ax.set_title(title, fontsize=11)
        ax.set_xticks(x, [pair_tick(r) for r in rows], rotation=35, ha="right", fontsize=9)
    axes[0].set_ylabel("test macro-F1 (95% CI)")
    axes[0].set_ylim(0, 1.06)
    handles = [Patch(color=family_colour(f), label=label) for f, label in family_labels(rows).items()]
    handles += [Patch(facecolor="white", edgecolor="grey", hatch="///", label="linear probe"),
                Patch(color="grey", label="fine-tune")]
    fig.legend(handles=handles, fontsize=9, loc="outside upper center", ncols=len(handles), frameon=False)
    return _save(fig, path)


def _binned_mean(x: np.ndarray, y: np.ndarray, n_bins: int = 8, min_tags: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``y`` in log-spaced bins of ``x`` (bins with at least ``min_tags`` points), at the bins'
    geometric centres."""
    edges = np.geomspace(x.min(), x.max() * 1.0001, n_bins + 1)
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, n_bins - 1)
    keep = [b for b in range(n_bins) if (which == b).sum() >= min_tags]
    return (np.sqrt(edges[keep] * edges[np.array(keep, dtype=int) + 1]),
            np.array([y[which == b].mean() for b in keep]))


def per_tag_f1(series: list[dict], tail_threshold: float, path: Path) -> Path:
    """Figure 3: per-tag test F1 against training images per tag (log x), one panel per strategy, colour per
    backbone, binned means as lines. ``series``: pair, family, strategy, random_init, train_count, f1 (arrays;
    tags with a test positive and at least one training image)."""
    strategies = list(dict.fromkeys(s["strategy"] for s in series))
    fig, axes = _figure(6.2 * len(strategies), 5, ncols=len(strategies), sharey=True)
    for ax, strategy in zip(axes, strategies):
        for s in (s for s in series if s["strategy"] == strategy):
            x, y = np.asarray(s["train_count"], float), np.asarray(s["f1"], float)
            colour = family_colour(s["family"])
            ax.scatter(x, y, s=12, color=colour, alpha=0.3, linewidths=0)
            if len(x) >= 3:
                bx, by = _binned_mean(x, y)
                ax.plot(bx, by, color=colour, linewidth=2.2, marker="o", markersize=4,
                        label=f"{FAMILY_LABELS.get(s['family'], s['family'])}"
                              f"{RANDOM_INIT if s['random_init'] else ''} (binned mean)")
        ax.axvline(tail_threshold, color="black", linestyle=":", linewidth=1.3)
        ax.text(tail_threshold * 1.07, 0.98, f"long-tail threshold: {tail_threshold:g} images", fontsize=8.5,
                rotation=90, va="top", ha="left", transform=ax.get_xaxis_transform())
        ax.set_xscale("log")
        ax.set_xlabel("training images per tag in the train split (log scale)")
        ax.set_title(STRATEGY_TITLES.get(strategy, strategy), fontsize=11)
        ax.legend(fontsize=8.5, loc="lower right")
    axes[0].set_ylabel("test F1 per tag")
    axes[0].set_ylim(-0.03, 1.03)
    return _save(fig, path)


PHASES = {"weights_load": "load weights", "image_cache": "image cache", "feature_extraction": "feature extraction",
          "trunk_caching": "trunk caching", "head_training": "head training", "block_training": "block fine-tuning",
          "thresholds": "threshold fitting"}
OTHER_PHASES = "other"
MINOR_SHARE = 0.01  # a phase shorter than this share of the longest bar in every bar is merged into "other"
# Phases in greys and hatches, apart from the backbone colours: light = the frozen backbone's pass over the
# images, dark = training, hatched = the fine-tune's variant of each; the short set-up phases are white (dotted,
# crossed), threshold fitting black.
WHITE = {"facecolor": "white", "edgecolor": "black", "linewidth": 0.6}
PHASE_STYLES = {"weights_load": WHITE | {"hatch": "..."}, "image_cache": WHITE | {"hatch": "xx"},
                "feature_extraction": {"color": "#BBBBBB"}, "trunk_caching": {"color": "#BBBBBB", "hatch": "///"},
                "head_training": {"color": "#555555"}, "block_training": {"color": "#555555", "hatch": "\\\\\\"},
                "thresholds": {"color": "black"}, OTHER_PHASES: WHITE}
PHASE_LABELS = PHASES | {OTHER_PHASES: f"other (< {MINOR_SHARE:.0%} each)"}


def merge_minor_phases(rows: list[dict], share: float = MINOR_SHARE) -> tuple[list[dict], list[str]]:
    """``rows`` with the phases too short to see (under ``share`` of the longest bar in every row) summed into
    one "other" phase, and the phases merged. ``rows``: pair, random_init, phases {phase key: seconds}."""
    longest = max((sum(r["phases"].values()) for r in rows), default=0.0)
    keys = list(dict.fromkeys(k for r in rows for k in r["phases"]))
    minor = [k for k in keys if all(r["phases"].get(k, 0.0) < share * longest for r in rows)]
    if len(minor) < 2:
        return rows, []
    merged = [r | {"phases": {k: v for k, v in r["phases"].items() if k not in minor}
                   | {OTHER_PHASES: sum(r["phases"].get(k, 0.0) for k in minor)}} for r in rows]
    return merged, minor


def training_time(rows: list[dict], path: Path) -> Path:
    """Figure 4: training time by phase, stacked horizontal bars (a bar's length is the pair's training time),
    phases in greys and hatches (not the backbone colours). ``rows``: pair, random_init, phases {phase key:
    seconds}, minor phases already merged (:func:`merge_minor_phases`)."""
    fig, (ax,) = _figure(9.5, 0.5 * len(rows) + 1.8)
    unit, scale = seconds_unit(max((sum(r["phases"].values()) for r in rows), default=0.0))
    unknown = sorted({k for r in rows for k in r["phases"]} - set(PHASES) - {OTHER_PHASES})
    order = [*PHASES, *unknown, OTHER_PHASES]
    present = [k for k in order if any(r["phases"].get(k, 0) > 0 for r in rows)]
    for k in present:
        seconds = np.array([r["phases"].get(k, 0.0) for r in rows]) / scale
        left = np.array([sum(r["phases"].get(j, 0.0) for j in present[:present.index(k)]) for r in rows]) / scale
        ax.barh(range(len(rows)), seconds, left=left, label=PHASE_LABELS.get(k, k),
                **({"edgecolor": "white"} | PHASE_STYLES.get(k, {"color": "#999999"})))
    ax.set_yticks(range(len(rows)), [pair_tick(r) for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"training time ({unit})")
    ax.set_title("Training time by phase")
    fig.legend(fontsize=9, loc="outside right upper", frameon=False)
    return _save(fig, path)


def deployed_delta(rows: list[dict], tolerances: dict[float, str], path: Path) -> Path:
    """Figure 5: macro-F1 of each deployed evaluation minus PyTorch fp32, per pair, as dots on stems from 0;
    a failed evaluation (NaN/Inf outputs) is a cross at 0 labelled FAILED; dotted lines at ± each tolerance.
    ``rows``: pair, random_init, deltas {evaluation label: difference, or None when it failed};
    ``tolerances``: {tolerance: the precisions it applies to, in words}."""
    labels = list(dict.fromkeys(k for r in rows for k in r["deltas"]))
    # not the backbone colours (these are runtimes), and a marker each so colour is never the only cue
    colours = dict(zip(labels, [OKABE_ITO[k] for k in ("black", "purple", "orange", "sky")] * 4))
    marks = dict(zip(labels, ["o", "s", "D", "^"] * 4))
    fig, (ax,) = _figure(9.5, 4.6)
    width = 0.7 / max(len(labels), 1)
    for j, label in enumerate(labels):
        for i, r in enumerate(rows):
            if label not in r["deltas"]:
                continue
            x, d = i + (j - (len(labels) - 1) / 2) * width, r["deltas"][label]
            if d is None:
                ax.plot(x, 0, marker="X", markersize=11, color=colours[label], linestyle="none")
                ax.annotate("FAILED", (x, 0), xytext=(0, 9), textcoords="offset points", ha="center", fontsize=8,
                            color=colours[label], fontweight="bold")
                continue
            ax.vlines(x, 0, d, color=colours[label], linewidth=2)
            ax.plot(x, d, marker=marks[label], markersize=8, color=colours[label], linestyle="none")
    for label in labels:
        ax.plot([], [], marker=marks[label], color=colours[label], linestyle="none", label=label)
    ax.axhline(0, color="black", linewidth=1)
    for tol, precisions in tolerances.items():
        for sign in (1, -1):
            ax.axhline(sign * tol, color="dimgrey", linestyle=":", linewidth=1.2)
        ax.annotate(f"±{tol:g} ({precisions})", (1, tol), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                    textcoords="offset points", ha="right", va="bottom", fontsize=8, color="dimgrey")
    ax.set_xticks(range(len(rows)), [pair_tick(r) for r in rows], rotation=20, ha="right")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("macro-F1 difference vs PyTorch fp32")
    lim = max([abs(d) for r in rows for d in r["deltas"].values() if d is not None] + list(tolerances), default=0.0)
    ax.set_ylim(-max(lim * 1.3, 0.002), max(lim * 1.3, 0.002))
    ax.set_title("Deployed vs PyTorch accuracy (0 = no change)")
    ax.legend(fontsize=8.5)
    return _save(fig, path)
