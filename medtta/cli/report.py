"""`medtta report`: statistics, tables and figures from the runs in an MLflow store."""

from __future__ import annotations

from pathlib import Path

import click

from medtta.cli.options import quiet_mlflow


@click.command("report")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path),
              help="Results dir whose MLflow store (mlflow.db) to read (default: $MEDTTA_RESULTS or "
                   "./medtta-results). The report goes to its report/ folder unless --out says otherwise.")
@click.option("--tracking-uri", help="MLflow tracking URI to read instead (default: $MLFLOW_TRACKING_URI or the "
                                     "SQLite store of --results).")
@click.option("--experiment", "experiments", multiple=True, default=("medtta/*",), show_default=True,
              metavar="PATTERN",
              help="Experiments to report on: an fnmatch pattern on the name, with or without its medtta/ prefix "
                   "(e.g. 'synth-*'); repeatable. `medtta site-eval` experiments are never included.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.md, the CSVs and the figures (default: <results>/report).")
@click.option("--bootstrap", "resamples", default=1000, show_default=True, type=click.IntRange(min=1000), metavar="N",
              help="Bootstrap resamples per confidence interval.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the bootstrap: the same seed gives the same intervals.")
@click.option("--select", "strategies", default="default,loso,entropy,agreement,oracle", show_default=True,
              metavar="STRATEGY[,STRATEGY...]",
              help="How to choose among the configurations of a sweep (`medtta bench --sweep`), per target site: "
                   "default (the paper's values), loso (best on the other target sites), val-site:SITE (best on "
                   "SITE, then left out), entropy (lowest prediction entropy, no collapsed case), agreement (with "
                   "the unadapted prediction), oracle (best on the site's own labels: an upper bound). Reported "
                   "with regret against the oracle and ranking agreement (Kendall's τ).")
@click.option("--log-figures/--no-log-figures", default=True, show_default=True,
              help="Also log the figures as artifacts (report/<figure>.png) of the parent runs they summarize; "
                   "their status and end time are left as they were.")
def report(results, tracking_uri, experiments, out, resamples, seed, strategies, log_figures) -> None:
    """Compare methods from the finished runs of `medtta run` / `medtta bench`, with confidence intervals.

    Reads MLflow only (nothing is re-run) and writes OUT/report.md with: Dice recovery per modality (the headline),
    the by-paradigm table (MedSeg-TTA's Table 3 layout), cost, and per protocol the Dice and recovery per target site
    with 95 % bootstrap intervals over cases, the spread over seeds and a Wilcoxon signed-rank test against the
    unadapted prediction, and every collapsed case; runs of the recurring setting add their recovery per round and
    its slope, sweeps the choice of a configuration (--select). CSVs hold the numbers (recovery_by_modality,
    dice_by_site, by_paradigm, cost, collapses, and source_site, recurring, selection, selection_rankings,
    selection_criteria and sensitivity when runs made them); PNG figures per protocol: recovery heatmap (method
    × target site), Dice per site with intervals, cost against recovery, recovery against each swept key after a
    sweep (sensitivity_<key>.png), and qualitative cases (image, ground truth, unadapted and adapted prediction)
    where the runs logged slices.
    """
    import mlflow  # noqa: F401  (it sets its log level on import: quieted after it)

    from medtta.paths import results_root
    from medtta.report.benchmark import headline_table, write_report
    from medtta.report.tables import Bootstrap
    from medtta.report.text import format_table
    from medtta.tracking import tracking_uri as resolve_uri

    quiet_mlflow()
    root = results_root(results)
    uri = resolve_uri(tracking_uri, root)
    written = write_report(uri, out or root / "report", experiments, Bootstrap(resamples, seed),
                           log_figures=log_figures, echo=click.echo,
                           strategies=[s.strip() for s in strategies.split(",") if s.strip()])
    click.echo("\nDice recovery per modality (95 % CI over cases, ±std over seeds):")
    click.echo(format_table(*headline_table(written.tables["recovery_by_modality"])))
    few = [r for r in written.tables["selection_rankings"] if r["few_methods"]]
    if few:
        settings = ", ".join(dict.fromkeys(f"{r['protocol']} ({r['setting']})" for r in few))
        click.echo(f"Warning: Kendall τ between strategies rests on fewer than 3 methods for {settings}: it is ±1 or "
                   "undefined whatever the strategy, not evidence", err=True)
    click.echo(f"\nReport: {written.markdown}")
