"""What `medtta site-eval` leaves in its output folder besides the masks: per-case and per-method CSVs, the
skipped inputs, `report.md` (the aggregate a site may send back: no image, no per-case row) and an MLflow store."""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

import medtta
from medtta.metrics import COLLAPSE_FRACTION
from medtta.registry import ADAPTERS
from medtta.report.text import format_table, markdown_table, write_csv
from medtta.site.bundle import Bundle
from medtta.site.evaluate import SiteEvalResult
from medtta.stats import Estimate
from medtta.tracking import Tracker

NO_LABELS = ("No labels: accuracy (Dice, HD95, recovery) cannot be measured on this site. The label-free "
             "indicators below say how each method changes the unadapted (source) prediction, i.e. which methods are "
             "at least safe; they do not say which is right.")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def accuracy_table(result: SiteEvalResult) -> tuple[list[str], list[list[str]]]:
    """Per method: Dice with its 95 % bootstrap interval over cases, Dice without adaptation, the bundle's in-domain
    Dice, recovery with its interval, the Wilcoxon p-value against the unadapted Dice, HD95, cost, collapses."""
    header = ["method", "cases", "dice [95% CI]", "dice_source", "dice_in_domain", "recovery [95% CI]", "p_vs_source",
              "hd95_mm", "s/volume", "collapsed"]
    rows = [[m, _fmt(int(s["cases"])), Estimate.of(s, "dice").format(), _fmt(s.get("dice_source")),
             _fmt(result.dice_in_domain), Estimate.of(s, "dice_recovery").format(), _fmt(s.get("p_vs_source")),
             _fmt(s.get("hd95"), 2), _fmt(s["seconds_per_volume"], 2), _fmt(int(s["collapsed_cases"]))]
            for m, s in result.summary.items()]
    return header, rows


def indicator_table(result: SiteEvalResult, labels: list[str]) -> tuple[list[str], list[list[str]]]:
    """Per method: mean entropy, fraction of voxels changed against source, foreground volume per label against
    source, collapsed cases."""
    header = ["method", "cases", "entropy", "changed_vs_source", *(f"vol_{n}/source" for n in labels), "s/volume",
              "collapsed"]
    rows = [[m, _fmt(int(s["cases"])), _fmt(s.get("entropy")), _fmt(s.get("changed_vs_source"), 4),
             *(_fmt(s.get(f"volume_ratio_{n}")) for n in labels), _fmt(s["seconds_per_volume"], 2),
             _fmt(int(s["collapsed_cases"]))] for m, s in result.summary.items()]
    return header, rows


def write_outputs(result: SiteEvalResult, bundle: Bundle, data: Path) -> None:
    """cases.csv (every method and case), summary.csv (per method), skipped.csv and report.md."""
    out = result.output
    write_csv(out / "cases.csv", result.rows)  # again, now with the union of the columns of every case
    write_csv(out / "summary.csv", [{"method": m, **s} for m, s in result.summary.items()])
    write_csv(out / "skipped.csv", [{"path": str(p), "reason": r} for p, r in result.skipped], ["path", "reason"])
    (out / "report.md").write_text(report_markdown(result, bundle, data), encoding="utf-8")


def report_markdown(result: SiteEvalResult, bundle: Bundle, data: Path) -> str:
    src = bundle.manifest["source"]
    labels = list(bundle.scored_labels)
    parts = [
        f"# Site evaluation: {result.name}",
        "",
        f"- medtta {medtta.__version__}, {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- model: `{bundle.root}` ({bundle.architecture}, trained on site {src['site']} of {src['protocol']}, "
        f"in-domain Dice {_fmt(bundle.dice_in_domain)} on {src['in_domain_cases']} source test case(s))",
        f"- input: `{data}`; {int(max(s['cases'] for s in result.summary.values()))} volume(s) evaluated, "
        f"{len(result.skipped)} skipped",
        f"- methods: {', '.join(result.methods)}",
        "",
    ]
    if result.labeled:
        parts += ["## Accuracy", "", "Dice recovery = (dice - dice_source) / (dice_in_domain - dice_source): 1 closes "
                  "the gap to the source site, 0 does nothing, below 0 harms. In brackets: 95 % percentile bootstrap "
                  "intervals over cases (1,000 resamples, seeded by --seed). `p_vs_source`: Wilcoxon signed-rank test "
                  "of the method's per-case Dice against the unadapted Dice of the same cases.", "",
                  markdown_table(*accuracy_table(result)), ""]
    else:
        parts += ["## Accuracy", "", NO_LABELS, ""]
    parts += ["## Label-free indicators", "",
              "Means over cases. `entropy`: mean softmax entropy per pixel (nats); `changed_vs_source`: fraction of "
              "voxels whose label differs from the unadapted prediction; `vol_<label>/source`: predicted volume of "
              f"the label over the unadapted one's. A case is collapsed when a label of the unadapted prediction "
              f"vanishes or shrinks below {COLLAPSE_FRACTION:.0%} of it.", "",
              markdown_table(*indicator_table(result, labels)), ""]
    collapses = [r for r in result.rows if r["collapsed"]]
    if collapses:
        parts += ["### Collapsed cases", "",
                  *(f"- {r['method']} on {r['case_id']}: {r['collapse']}" for r in collapses), ""]
    if result.skipped:
        parts += ["## Skipped inputs", "", *(f"- `{p}`: {reason}" for p, reason in result.skipped), ""]
    return "\n".join(parts)


def log_to_mlflow(result: SiteEvalResult, bundle: Bundle, config_params: dict[str, Any],
                  hparams: dict[str, dict[str, Any]]) -> str:
    """A run per method in the experiment `medtta/site-<name>` of the SQLite store in the output folder, with the
    method's hyper-parameters (`hp.<name>`, defaults included); returns the tracking URI."""
    uri = f"sqlite:///{result.output.resolve() / 'mlflow.db'}"
    tracker = Tracker(uri, f"site-{result.name}", result.output.resolve() / "mlartifacts")
    src = bundle.manifest["source"]
    for method, summary in result.summary.items():
        tags = {"medtta.method": method, "medtta.site": result.name, "medtta.protocol": src["protocol"],
                "medtta.modality": bundle.manifest["modality"], "medtta.architecture": bundle.architecture,
                "medtta.source_site": src["site"], "medtta.kind": "site-eval", "medtta.labeled": result.labeled}
        used = {**ADAPTERS.get(method).defaults, **hparams.get(method, {})}
        params = {"method": method, **config_params, **{f"hp.{k}": v for k, v in used.items()}}
        with tracker.run(method, tags, params):
            tracker.log_metrics({**summary, "dice_in_domain": result.dice_in_domain})
            tracker.log_table([r for r in result.rows if r["method"] == method], "cases")
            tracker.log_artifact(result.output / "report.md")
    return uri


def console_summary(result: SiteEvalResult, bundle: Bundle) -> str:
    """What the command prints: the accuracy table (or why there is none) and the indicator table."""
    parts = []
    if result.labeled:
        parts += ["Accuracy (mean over cases):", format_table(*accuracy_table(result)), ""]
    else:
        parts += [NO_LABELS, ""]
    parts += ["Label-free indicators (mean over cases):", format_table(*indicator_table(result, list(
        bundle.scored_labels)))]
    return "\n".join(parts)
