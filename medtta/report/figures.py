"""The report's PNG figures, drawn with matplotlib's object API on the Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

DPI = 120
ROWS_OF_CASES = 4  # qualitative figure: at most this many cases


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def recovery_heatmap(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Method × target site Dice recovery, blue where adaptation closes the gap, red where it harms (colours clipped
    to [-1, 1], the numbers not)."""
    from matplotlib import colormaps

    methods, sites = list(dict.fromkeys(r["method"] for r in rows)), list(dict.fromkeys(r["site"] for r in rows))
    grid = np.full((len(methods), len(sites)), np.nan)
    for r in rows:
        grid[methods.index(r["method"]), sites.index(r["site"])] = r["dice_recovery"]
    fig = _figure(1.6 + 0.9 * len(sites), 1.2 + 0.4 * len(methods))
    ax = fig.add_subplot()
    cmap = colormaps["RdBu"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, "n/a" if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="white" if not math.isnan(value) and abs(value) > 0.6 else "black")
    ax.set_xticks(range(len(sites)), sites)
    ax.set_yticks(range(len(methods)), methods)
    ax.set_xlabel("target site")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="Dice recovery")
    return _save(fig, path)


def dice_per_site(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Mean Dice per target site with its bootstrap interval, one marker per method; a black dash marks the mean
    unadapted Dice of the methods' source models on the site."""
    methods, sites = list(dict.fromkeys(r["method"] for r in rows)), list(dict.fromkeys(r["site"] for r in rows))
    fig = _figure(2 + 1.2 * len(sites) + 0.1 * len(methods) * len(sites), 3.4)
    ax = fig.add_subplot()
    width = 0.8 / max(len(methods), 1)
    for k, method in enumerate(methods):
        of_method = {r["site"]: r for r in rows if r["method"] == method}
        x = [sites.index(s) - 0.4 + width * (k + 0.5) for s in of_method]
        y = np.array([r["dice"] for r in of_method.values()])
        low = np.array([r["dice_ci_low"] for r in of_method.values()])
        high = np.array([r["dice_ci_high"] for r in of_method.values()])
        errors = np.nan_to_num(np.vstack([y - low, high - y]))
        ax.errorbar(x, y, yerr=errors, fmt="o", capsize=3, label=method)
    for j, site in enumerate(sites):
        source = [r["dice_source"] for r in rows if r["site"] == site]
        ax.hlines(np.nanmean(source), j - 0.45, j + 0.45, colors="black", linestyles="dashed", linewidth=1,
                  label="unadapted" if j == 0 else None)
    ax.set_xticks(range(len(sites)), sites)
    ax.set_xlabel("target site")
    ax.set_ylabel("Dice (95 % CI over cases)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def cost_vs_recovery(points: list[dict[str, Any]], title: str, path: Path) -> Path:
    """One point per method: cost (seconds per volume over unadapted inference; a log scale when the ratios span more
    than tenfold) against Dice recovery over the protocol's target sites, with its interval."""
    fig = _figure(5.5, 3.8)
    ax = fig.add_subplot()
    for p in points:
        ratio = p["cost_ratio"] if p["cost_ratio"] > 0 else math.nan
        error = np.nan_to_num([[p["dice_recovery"] - p["dice_recovery_ci_low"]],
                               [p["dice_recovery_ci_high"] - p["dice_recovery"]]])
        ax.errorbar([ratio], [p["dice_recovery"]], yerr=error, fmt="o", capsize=3)
        ax.annotate(p["method"], (ratio, p["dice_recovery"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(0, color="0.5", linewidth=0.8)
    ratios = [p["cost_ratio"] for p in points if p["cost_ratio"] > 0]
    if ratios and max(ratios) > 10 * min(ratios):  # a log scale only where it spreads the points
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("cost: seconds per volume / unadapted")
    ax.set_ylabel("Dice recovery (95 % CI)")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def pick_cases(candidates: list[dict[str, Any]], count: int = ROWS_OF_CASES) -> list[dict[str, Any]]:
    """The cases to show: the worst collapse, the largest gain, then the largest drops. `candidates` are sorted by
    Dice change, worst first (`tables.case_changes`)."""
    chosen = [c for c in candidates if c["collapsed"]][:1]
    for c in [*candidates[-1:], *candidates]:
        if len(chosen) < count and all(c is not o for o in chosen):
            chosen.append(c)
    return chosen


def qualitative(cases: list[tuple[dict[str, Any], dict[str, np.ndarray]]], title: str, path: Path) -> Path:
    """One row per case: the image, the reference, the unadapted and the adapted prediction of the same slice."""
    from matplotlib import colormaps

    labels = colormaps["tab10"]
    fig = _figure(9, 2.3 * len(cases) + 0.4)
    fig.suptitle(title, fontsize=10)
    axes = fig.subplots(len(cases), 4, squeeze=False)
    columns = ("image", "ground truth", "unadapted (source)", "adapted")
    for row, (case, arrays) in zip(axes, cases, strict=True):
        image = arrays["image"]
        for k, (ax, key) in enumerate(zip(row, ("image", "reference", "source", "adapted"), strict=True)):
            ax.imshow(image, cmap="gray", interpolation="nearest")
            if key != "image":
                mask = np.ma.masked_equal(np.asarray(arrays[key]), 0)
                ax.imshow(mask, cmap=labels, vmin=0, vmax=9, alpha=0.6, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if case is cases[0][0]:
                ax.set_title(columns[k], fontsize=9)
        row[0].set_ylabel(case_caption(case), fontsize=7)
    return _save(fig, path)


def case_caption(case: dict[str, Any]) -> str:
    """`bn-stats · B · B001 · seed 0` and its Dice before and after (and the collapse reason)."""
    cell, row = case["cell"], case["row"]
    dice, source = float(row.get("dice", math.nan)), float(row.get("dice_source", math.nan))
    caption = f"{cell.label} · {case['site'].site} · {row['case_id']}\nseed {cell.seed}: Dice {source:.2f} → {dice:.2f}"
    if case["collapsed"]:
        caption += "\ncollapsed" + (f": {row['collapse']}" if row.get("collapse") else "")
    return caption


def sensitivity(points: list[dict[str, Any]], key: str, title: str, path: Path) -> Path:
    """Recovery against one swept key (log scale for the learning rate), one line per method through its
    configurations' mean recovery at each value (several configurations at one value: other swept values)."""
    from matplotlib import colormaps

    fig = _figure(5.5, 3.8)
    ax = fig.add_subplot()
    for k, method in enumerate(dict.fromkeys(p["method"] for p in points)):  # tab20: 17 methods, no repeated colour
        mine = [p for p in points if p["method"] == method]
        values = sorted({p["value"] for p in mine})
        curve = [float(np.nanmean([p["dice_recovery"] for p in mine if p["value"] == v])) for v in values]
        ax.plot(values, curve, marker="os^Dv"[k % 5], color=colormaps["tab20"](k % 20), label=method)
    if key == "lr":
        ax.set_xscale("log")
    ax.axhline(0, color="0.5", linewidth=0.8)
    ax.set_xlabel(key)
    ax.set_ylabel("Dice recovery (mean over target sites)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)
