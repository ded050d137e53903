"""Human-readable summaries of runs: plain-text and Markdown tables, CSV files."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medtta.metrics import site_recovery_flag

if TYPE_CHECKING:
    from medtta.engine import RunResult, SiteResult


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def summary_table(result: RunResult) -> str:
    """Per target site: Dice before and after adaptation, in-domain Dice (with its number of source test cases),
    recovery, cost."""
    header = ["site", "cases", "dice_source", "dice_adapted", "dice_in_domain (cases)", "recovery", "s/volume",
              "collapsed"]
    in_domain = f"{_fmt(result.dice_in_domain)} ({result.in_domain_cases})"
    rows = [[s.site, _cases(s.summary), _fmt(s.summary.get("dice_source", math.nan)),
             _fmt(s.summary.get("dice", math.nan)), in_domain, _recovery(s.summary, result.dice_in_domain),
             _fmt(s.summary["seconds_per_volume"], 2), str(int(s.summary["collapsed_cases"]))]
            for s in result.sites]
    return format_table(header, rows)


def _cases(summary: dict[str, float]) -> str:
    """Volumes, and the passes over them where a stream visits each several times (recurring)."""
    cases, passes = int(summary["cases"]), int(summary.get("passes", summary["cases"]))
    return str(cases) if passes == cases else f"{cases} ({passes} passes)"


def _recovery(summary: dict[str, float], in_domain: float) -> str:
    """The recovery, marked `!` outside `RECOVERY_RANGE` (the reason is printed below the table)."""
    return _fmt(summary["dice_recovery"]) + (" !" if site_recovery_flag(summary, in_domain) else "")


def store_args(uri: str, results: Path) -> str:
    """The options naming a store for `medtta ui` / `medtta report`: `--results DIR` for the results dir's own."""
    from medtta.tracking import tracking_uri

    return f"--results {results}" if uri == tracking_uri(None, results) else f"--tracking-uri {uri}"


def recovery_notes(result: RunResult) -> list[str]:
    """A line per target site whose recovery is outside `RECOVERY_RANGE`, with the reason."""
    return [f"  ! {s.site}: recovery {_fmt(s.summary['dice_recovery'])}: {reason}" for s in result.sites
            if (reason := site_recovery_flag(s.summary, result.dice_in_domain))]


def cost_line(result: RunResult) -> str:
    """Seconds per volume adapted and unadapted, their ratio, and the run's peak memory, in one line."""
    m = result.metrics
    memory = "CUDA max allocated" if result.device == "cuda" else "peak resident set"
    return (f"Cost: {_fmt(m['seconds_per_volume'], 2)} s/volume adapted vs {_fmt(m['seconds_per_volume_source'], 2)} "
            f"unadapted (x{_fmt(m['cost_ratio'], 2)}); peak memory {m['peak_memory_mb']:.0f} MB ({memory})")


def source_site_line(site: SiteResult) -> str:
    """The source-site check of a run in one line: Dice adapted and unadapted, the harm, collapsed cases."""
    s = site.summary
    return (f"Source site {site.site} (its own stream, {int(s['cases'])} case(s)): Dice "
            f"{_fmt(s.get('dice', math.nan))} adapted vs {_fmt(s.get('dice_source', math.nan))} unadapted; "
            f"source-site harm {_fmt(s['source_site_harm'])} (below 0: adaptation lowers Dice without domain shift); "
            f"{int(s['collapsed_cases'])} collapsed")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str] | None = None) -> None:
    """Rows with possibly different keys, as one CSV (`fields`, else the union of the keys in first-seen order)."""
    fields = fields or list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
