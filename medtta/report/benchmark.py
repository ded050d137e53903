"""`medtta report`: from the finished runs of an MLflow store to `report.md`, CSV tables and PNG figures, the figures
also logged as artifacts (`report/<figure>.png`) of the parent runs they summarize."""

from __future__ import annotations

import datetime
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import medtta
from medtta.metrics import COLLAPSE_FRACTION, RECOVERY_RANGE
from medtta.report import figures
from medtta.report import selection as sel
from medtta.report import tables as t
from medtta.report.store import Cell, Store, read_store
from medtta.report.text import markdown_table, write_csv
from medtta.stats import PARADIGMS, Estimate

CSVS = ("recovery_by_modality", "dice_by_site", "by_paradigm", "cost", "collapses")
# written only when they have rows: some run made the source-site check, recurred, or a sweep ran configurations
CHECK_CSVS = ("source_site", "recurring", "selection", "selection_rankings", "selection_criteria", "sensitivity")
FIGURES = ("recovery_heatmap", "dice_per_site", "cost_vs_recovery", "qualitative")
ARTIFACT_DIR = "report"  # figures land in each parent run as report/<figure>.png


@dataclass
class Report:
    """What `write_report` wrote: the tables by CSV name, the figures per protocol, the runs they were logged to."""

    out: Path
    store: Store
    boot: t.Bootstrap
    tables: dict[str, list[dict[str, Any]]]
    figures: dict[str, list[Path]] = field(default_factory=dict)
    logged_runs: list[str] = field(default_factory=list)

    @property
    def markdown(self) -> Path:
        return self.out / "report.md"


def compute_tables(cells: list[Cell], boot: t.Bootstrap = t.DEFAULT, strategies: Sequence[str] = sel.STRATEGIES
                   ) -> dict[str, list[dict[str, Any]]]:
    """Every table of the report, by CSV name (see `medtta.report.tables` and `medtta.report.selection`)."""
    by_modality = t.recovery_by_modality(cells, boot)
    families = sel.families(cells)
    selection = sel.selection_rows(families, strategies, boot)
    return {"recovery_by_modality": by_modality, "dice_by_site": t.dice_by_site(cells, boot),
            "by_paradigm": t.by_paradigm(by_modality), "cost": t.cost(cells), "collapses": t.collapses(cells),
            "source_site": t.source_site(cells, boot), "recurring": t.recurring(cells), "selection": selection,
            "selection_rankings": sel.ranking_agreement(selection),
            "selection_criteria": sel.criterion_correlation(families), "sensitivity": sel.sensitivity(families)}


def csv_names(tables: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The CSVs a report writes: every table, and the source-site check's when it has rows."""
    return [*CSVS, *(name for name in CHECK_CSVS if tables[name])]


def write_report(uri: str, out: Path, patterns: Sequence[str] = ("medtta/*",), boot: t.Bootstrap = t.DEFAULT,
                 log_figures: bool = True, echo: Callable[[str], None] = lambda _: None,
                 strategies: Sequence[str] = sel.STRATEGIES) -> Report:
    """Read the store at `uri` (the experiments matching `patterns`), write `out/report.md`, the CSVs and the figures
    (`out/<protocol>/*.png`), and log each protocol's figures into its parent runs (without touching their status).

    Raises:
        MedttaError: no store, no matching experiment or no finished run.
    """
    store = read_store(uri, patterns, echo)
    echo(f"Statistics: {len(store.cells)} cell(s), {boot.resamples} bootstrap resamples (seed {boot.seed})")
    report = Report(out, store, boot, compute_tables(store.cells, boot, sel.check_strategies(strategies)))
    out.mkdir(parents=True, exist_ok=True)
    for name in csv_names(report.tables):
        write_csv(out / f"{name}.csv", report.tables[name], None if report.tables[name] else [_EMPTY[name]])
    for protocol, cells in t.group(store.cells, lambda c: c.protocol).items():
        report.figures[protocol] = protocol_figures(report, protocol, cells)
    report.markdown.write_text(report_markdown(report), encoding="utf-8")
    count = sum(len(f) for f in report.figures.values())
    echo(f"Wrote {report.markdown}, {len(csv_names(report.tables))} CSV file(s) and {count} figure(s) in {out}")
    if log_figures:
        log_to_runs(report)
        echo(f"Logged the figures into {len(report.logged_runs)} parent run(s) as {ARTIFACT_DIR}/<figure>.png")
    return report


_EMPTY = {"collapses": "case_id"}  # the header of an empty CSV


def protocol_figures(report: Report, protocol: str, cells: list[Cell]) -> list[Path]:
    """A protocol's figures under `out/<protocol>/`: recovery heatmap, Dice per site, cost against recovery, and the
    qualitative grid when its runs logged slices."""
    folder, boot = report.out / protocol, report.boot
    sites = [r for r in report.tables["dice_by_site"] if r["protocol"] == protocol]
    title = f"{protocol} ({cells[0].modality}), source site {cells[0].params.get('source_site', '?')}"
    paths = [figures.recovery_heatmap(sites, f"Dice recovery, {title}", folder / "recovery_heatmap.png"),
             figures.dice_per_site(sites, f"Dice per target site, {title}", folder / "dice_per_site.png")]
    recovery = {r["method"]: r for r in t.recovery_by_modality(cells, boot)}  # over this protocol's sites
    points = [{**r, **{k: v for k, v in recovery[r["method"]].items() if k.startswith("dice_recovery")}}
              for r in report.tables["cost"] if r["protocol"] == protocol]
    paths.append(figures.cost_vs_recovery(points, f"Cost against recovery, {title}", folder / "cost_vs_recovery.png"))
    sensitivity = [p for p in report.tables["sensitivity"] if p["protocol"] == protocol]
    for key in dict.fromkeys(p["key"] for p in sensitivity):
        paths.append(figures.sensitivity([p for p in sensitivity if p["key"] == key], key,
                                         f"Recovery against {key}, {title}", folder / f"sensitivity_{key}.png"))
    changes = t.case_changes(cells)
    chosen = figures.pick_cases([c for c in changes if c["cell"].paradigm != "none"] or changes)  # source: no change
    if chosen:
        with tempfile.TemporaryDirectory(prefix="medtta-slices-") as tmp:
            cases = [(c, _load_slice(report.store, c, Path(tmp) / str(k))) for k, c in enumerate(chosen)]
            paths.append(figures.qualitative(cases, f"Qualitative cases, {title}", folder / "qualitative.png"))
    return paths


def _load_slice(store: Store, case: dict[str, Any], dst: Path) -> dict[str, np.ndarray]:
    with np.load(store.download(case["site"].run_id, case["artifact"], dst)) as npz:
        return {k: npz[k] for k in ("image", "reference", "source", "adapted")}


def log_to_runs(report: Report) -> None:
    """Each protocol's figures as artifacts of each of its parent runs. `MlflowClient.log_artifact` only writes to the
    run's artifact store: the run's status and end time stay as they were."""
    for protocol, paths in report.figures.items():
        for cell in (c for c in report.store.cells if c.protocol == protocol):
            for path in paths:
                report.store.client.log_artifact(cell.run_id, str(path), ARTIFACT_DIR)
            report.logged_runs.append(cell.run_id)


# Markdown


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _p(value: float) -> str:
    return "n/a" if math.isnan(value) else "<0.001" if value < 0.001 else f"{value:.3f}"


def _ci(row: dict[str, Any], key: str, digits: int = 3) -> str:
    """`0.612 [0.551, 0.671] ±0.020`: the value, its interval over cases, its standard deviation over seeds."""
    text = Estimate.of(row, key).format(digits)
    std = row.get(f"{key}_seed_std", math.nan)
    return text if text == "n/a" or math.isnan(std) else f"{text} ±{_num(std, digits)}"


def headline_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Dice recovery per modality: a row per method, a column per modality, and after a modality whose runs made the
    source-site check, its source-site harm."""
    modalities = list(dict.fromkeys(r["modality"] for r in rows))
    checked = {r["modality"] for r in rows if "source_site_harm" in r}
    columns = [(mod, key) for mod in modalities for key in ("dice_recovery", "source_site_harm")
               if key == "dice_recovery" or mod in checked]
    cells = {(r["method"], r["modality"]): r for r in rows}
    methods = {r["method"]: r["paradigm"] for r in rows}
    several = len(modalities) > 1
    header = [mod if key == "dice_recovery" else "source-site harm" + (f" ({mod})" if several else "")
              for mod, key in columns]
    return (["method", "paradigm", *header],
            [[m, p, *(_ci(cells[m, mod], key) if (m, mod) in cells else "-" for mod, key in columns)]
             for m, p in methods.items()])


def paradigm_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """MedSeg-TTA's Table 3: per modality, no adaptation next to the mean Dice of each paradigm's methods."""
    out = []
    for modality in dict.fromkeys(r["modality"] for r in rows):
        cells = {r["paradigm"]: r for r in rows if r["modality"] == modality}
        out.append([modality, _num(cells["none"]["dice"]),
                    *(f"{_num(cells[p]['dice'])} ({cells[p]['delta']:+.3f}; {cells[p]['methods']})" if p in cells
                      else "-" for p in PARADIGMS)])
    return ["modality", "no adaptation", *PARADIGMS], out


def site_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "site", "cases × seeds", "Dice [95 % CI] ±seeds", "unadapted Dice", "recovery [95 % CI] ±seeds",
              "Wilcoxon p", "collapsed"]
    return header, [[r["method"], r["site"], f"{r['cases']} × {r['seeds']}", _ci(r, "dice"), _num(r["dice_source"]),
                     _ci(r, "dice_recovery") + (" !" if r.get("recovery_flag") else ""), _p(r["p_vs_source"]),
                     str(r["collapsed_cases"])] for r in rows]


def recovery_flags(rows: list[dict[str, Any]]) -> list[str]:
    """A bullet per site row whose recovery is outside `RECOVERY_RANGE` (marked `!` in its table), with why."""
    low, high = RECOVERY_RANGE
    return ([f"`!` recovery outside [{low:g}, {high:g}]:", ""]
            + [f"- {r['method']} on {r['site']}: {r['recovery_flag']}" for r in rows if r.get("recovery_flag")]
            + [""] if any(r.get("recovery_flag") for r in rows) else [])


def source_site_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "site", "cases × seeds", "Dice [95 % CI] ±seeds", "unadapted Dice",
              "source-site harm [95 % CI] ±seeds", "Wilcoxon p", "collapsed"]
    return header, [[r["method"], r["site"], f"{r['cases']} × {r['seeds']}", _ci(r, "dice"), _num(r["dice_source"]),
                     _ci(r, "source_site_harm"), _p(r["p_vs_source"]), str(r["collapsed_cases"])] for r in rows]


def cost_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "protocol", "s/volume", "unadapted s/volume", "× unadapted", "peak memory (MB)"]
    return header, [[r["method"], r["protocol"], _num(r["seconds_per_volume"]), _num(r["seconds_per_volume_source"]),
                     _num(r["cost_ratio"], 2), _num(r["peak_memory_mb"], 0)] for r in rows]


def recurring_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    rounds = max(r["rounds"] for r in rows)
    header = ["method", "protocol", "seeds", *(f"round {k}" for k in range(1, rounds + 1)), "slope / round"]
    return header, [[r["method"], r["protocol"], str(r["seeds"]),
                     *(_num(r.get(f"round_{k}", math.nan)) for k in range(1, rounds + 1)), _num(r["slope"], 4)]
                    for r in rows]


def selection_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "protocol", "strategy", "sites", "recovery [95 % CI]", "regret vs oracle", "picks"]
    return header, [[r["method"], r["protocol"] + ("" if r["setting"] == "episodic" else f" ({r['setting']})"),
                     r["strategy"] + (" (uses test labels)" if r["uses_test_labels"] else "")
                     + (" (the method's own loss)" if r["own_loss"] else ""), str(r["sites"]),
                     _ci(r, "dice_recovery"), _num(r["regret"]), r["picks"]] for r in rows]


def collapse_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "protocol", "site", "seed", "case", "Dice unadapted → adapted", "foreground / unadapted",
              "reason"]
    return header, [[r["method"], r["protocol"], r["site"], str(r["seed"]), str(r["case_id"]),
                     f"{_num(r['dice_source'])} → {_num(r['dice'])}", _num(r["foreground_ratio"], 2),
                     r["collapse"] or "-"] for r in rows]


def report_markdown(report: Report) -> str:
    store, tables, boot = report.store, report.tables, report.boot
    cases = sum(len(s.rows) for c in store.cells for s in t.all_sites(c))
    checked = bool(tables["source_site"])
    left_out = [f"{store.unfinished} unfinished run(s) (running, failed or killed)" if store.unfinished else "",
                f"{store.duplicates} older run(s) of a cell run again" if store.duplicates else ""]
    parts = [
        "# medtta benchmark report", "",
        f"- medtta {medtta.__version__}, {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- store: `{store.uri}`; experiments: {', '.join(store.experiments)}",
        f"- {len(store.cells)} finished cell(s) (method × protocol × seed × setting), {cases} case evaluation(s)"
        + (f"; left out: {'; '.join(x for x in left_out if x)}" if any(left_out) else ""),
        f"- intervals: {boot.confidence:.0%} percentile bootstrap over cases, {boot.resamples} resamples, seed "
        f"{boot.seed}; `±` is the standard deviation over seeds", "",
        "## Dice recovery per modality", "",
        "The headline: recovery over every target site of every protocol of the modality (a site's recovery is "
        "averaged over seeds; sites weigh equally; cases are resampled within each site)."
        + (" Source-site harm: the mean over the source sites' test cases of adapted minus unadapted Dice, the "
           "methods adapting there as a stream of their own (no domain shift: below 0, adaptation harms)."
           if checked else ""), "",
        markdown_table(*headline_table(tables["recovery_by_modality"])), "",
        "## By paradigm", "",
        "Mean Dice of each paradigm's methods over the modality's target sites, next to no adaptation (the mean "
        "unadapted Dice of the source models the methods start from), as in MedSeg-TTA's Table 3; in brackets the "
        "change against those methods' own unadapted Dice, and the methods.", "",
        markdown_table(*paradigm_table(tables["by_paradigm"])), "",
        "## Cost", "",
        "Means over seeds. `× unadapted`: seconds per volume over unadapted inference on the same volumes; peak "
        "memory: CUDA max allocated on GPU, peak RSS on CPU (n/a for runs that did not log it).", "",
        markdown_table(*cost_table(tables["cost"])), "",
    ]
    for protocol, cells in t.group(store.cells, lambda c: c.protocol).items():
        first = cells[0]
        rows = [r for r in tables["dice_by_site"] if r["protocol"] == protocol]
        parts += [f"## {protocol}", "",
                  f"{first.modality}, source site {first.params.get('source_site', '?')}; settings "
                  f"{', '.join(sorted({c.setting for c in cells}))}; seeds "
                  f"{', '.join(map(str, sorted({c.seed for c in cells})))}.", "",
                  markdown_table(*site_table(rows)), "", *recovery_flags(rows)]
        source = [r for r in tables["source_site"] if r["protocol"] == protocol]
        if source:
            parts += [f"Source-site check: the methods adapting on source site {source[0]['site']}'s own test cases "
                      "(no domain shift), as a stream of their own; not part of any number above.", "",
                      markdown_table(*source_site_table(source)), ""]
        for path in report.figures.get(protocol, []):
            parts += [f"![{path.stem.replace('_', ' ')}]({path.relative_to(report.out).as_posix()})", ""]
        if not any(p.stem == "qualitative" for p in report.figures.get(protocol, [])):
            parts += ["No qualitative figure: these runs logged no `slices/*.npz`.", ""]
    if tables["selection"]:
        parts += ["## Choosing a configuration", "",
                  "Methods that ran several configurations (`medtta bench --sweep`), each strategy picking one per "
                  "target site from what it may see: `default` the paper's values; `loso` the best mean recovery on "
                  "the protocol's other target sites; `val-site:SITE` the best on SITE, which is then not scored; "
                  "`entropy` the lowest mean prediction entropy on the site; `agreement` the highest agreement with "
                  "the unadapted prediction (both among configurations that collapsed none of the site's cases by "
                  "the label-free flag: a label of the unadapted prediction vanished or shrank); `oracle` the "
                  "best on the site's own test labels, an upper bound and not a result. Regret: the oracle's "
                  "recovery minus the strategy's, on the same sites.", "",
                  markdown_table(*selection_table(tables["selection"])), "",
                  "Kendall's τ between the methods' ranking by each strategy and by the oracle (per protocol and "
                  "setting):", "",
                  markdown_table(["protocol", "setting", "strategy", "methods", "Kendall τ"],
                                 [[r["protocol"], r["setting"], r["strategy"], str(r["methods"]),
                                   _num(r["kendall_tau"]) + (" ⚠" if r["few_methods"] else "")]
                                  for r in tables["selection_rankings"]]), "",
                  *([f"⚠ fewer than {sel.MIN_RANKED} methods: τ is ±1 (or undefined) whatever the strategy, so "
                     "it says nothing about it; sweep more methods.", ""]
                    if any(r["few_methods"] for r in tables["selection_rankings"]) else []),
                  "How well each label-free criterion ranks a method's configurations on a site by true recovery "
                  "(Kendall's τ, entropy negated, mean over methods and sites):", "",
                  markdown_table(["protocol", "criterion", "method × site pairs", "Kendall τ"],
                                 [[r["protocol"], r["criterion"], str(r["method_sites"]), _num(r["kendall_tau"])]
                                  for r in tables["selection_criteria"]]), ""]
    if tables["recurring"]:
        parts += ["## Recurring stream", "",
                  "The recurring setting: the target sites' stream repeated round after round without a reset. Dice "
                  "recovery per round (mean over sites and seeds) and its least-squares slope per round: below 0, "
                  "the model degrades the longer it adapts (long-horizon collapse).", "",
                  markdown_table(*recurring_table(tables["recurring"])), ""]
    parts += ["## Collapsed cases", ""]
    if tables["collapses"]:
        parts += [f"{len(tables['collapses'])} collapsed case(s), worst Dice drop first:", "",
                  markdown_table(*collapse_table(tables["collapses"])), ""]
    else:
        parts += [f"None of the {cases} case evaluation(s) collapsed.", ""]
    parts += [
        "## How to read this report", "",
        "- **Dice**: volume Dice per case, the mean over the scored labels; a method's Dice on a site is the mean over "
        "seeds of the mean over cases.",
        "- **Dice recovery** = (Dice - unadapted Dice) / (in-domain Dice - unadapted Dice): 1 closes the gap to the "
        "source site, 0 does nothing, below 0 harms; n/a when the site has no gap.",
        "- **Wilcoxon p**: two-sided signed-rank test (`scipy.stats.wilcoxon`) of the method's per-case Dice (mean "
        "over seeds) against the unadapted Dice of the same cases. The unadapted Dice is each row's `dice_source`: "
        "the prediction of the cached unadapted model on that very volume, which is what the `source` method "
        "predicts, so every method is paired with the same baseline. With n cases the smallest possible p is "
        "2 / 2^n (0.5 for 2 cases, 0.0625 for 5): few cases cannot show significance.",
        f"- **Collapse**: a case is flagged by its run (the `collapsed` column of its `cases.json`, the reason in "
        f"`collapse`) when a foreground label of the reference vanishes from the adapted prediction, or, in runs that "
        f"log foreground volumes, the predicted foreground shrinks below {COLLAPSE_FRACTION:.0%} of the unadapted "
        "prediction's. Collapsed cases are listed above, never averaged away.",
        *(["- **Source-site harm** = mean over the source site's test cases of (adapted Dice - unadapted Dice), "
           "the method adapting on them after a reset, as a stream of its own (`medtta run --include-source-site`): "
           "with no domain shift, adaptation should change nothing; below 0 it harms. Recovery is undefined there "
           "(no gap), and the source site enters no recovery or target-site number."] if checked else []),
        f"- Per-row numbers with every interval bound: {', '.join(f'`{n}.csv`' for n in csv_names(tables))}.", ""]
    return "\n".join(parts)
