"""`medtta` command line."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import click

from medtta import __version__
from medtta.cli.options import parse_params
from medtta.cli.site import export, site_eval
from medtta.errors import MedttaError, MedttaWarning


class MedttaGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 2, without a traceback; prints our warnings as
    one line too."""

    def invoke(self, ctx: click.Context):
        with warnings.catch_warnings():  # restores the filters and printer when the command ends
            warnings.simplefilter("always", MedttaWarning)
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except MedttaError as err:
                click.echo(f"Error: {err}", err=True)
                sys.exit(2)


_python_showwarning = warnings.showwarning


def _show_warning(message, category, *args, **kwargs) -> None:
    """Our warnings as one line on stderr, like our errors; the others as Python prints them."""
    if issubclass(category, MedttaWarning):
        click.echo(f"Warning: {message}", err=True)
    else:
        _python_showwarning(message, category, *args, **kwargs)


@click.group(cls=MedttaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="medtta")
def main() -> None:
    """Test-time adaptation of medical image segmentation models across hospital sites.

    Train a model on one site, adapt it at the others, and compare methods by Dice recovery
    in MLflow. Start with:  medtta run --method tent --dataset synth-mri
    """


@main.command()
@click.option("--method", "-m", required=True, help="Adaptation method (see `medtta list adapters`).")
@click.option("--dataset", "-d", required=True,
              help="A protocol name (see `medtta list protocols`), a protocol YAML file, or a dataset folder "
                   "in the medtta layout (then --source-site is required).")
@click.option("--source-site", help="Site the source model is trained on (default: the protocol's).")
@click.option("--target-site", "target_sites", multiple=True,
              help="Target site to adapt to; repeatable (default: every other site, in protocol order).")
@click.option("--setting", type=click.Choice(["episodic", "continual"]),
              help="episodic: reset per volume, update then predict; continual: one stream of sites, "
                   "predict then update (default: the protocol's, usually episodic).")
@click.option("--seed", default=0, show_default=True, type=int, help="Fixes source training and adaptation.")
@click.option("--steps", type=click.IntRange(min=0),
              help="Adaptation iterations per volume in the episodic setting (default: the method's).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Slices per batch (a batch never mixes volumes).")
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
              help="Method hyper-parameter, e.g. -p lr=1e-4; repeatable.")
@click.option("--arch-param", "-a", "arch_params", multiple=True, metavar="KEY=VALUE",
              help="Source-architecture config, e.g. -a dae_epochs=20 (see `medtta list architectures`); "
                   "repeatable. Part of the source model's cache key.")
@click.option("--epochs", type=click.IntRange(min=1), help="Source-training epochs (default: the protocol's).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="auto uses CUDA when present.")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path),
              help="Results dir: models, tables, MLflow store (default: $MEDTTA_RESULTS or ./medtta-results).")
@click.option("--tracking-uri",
              help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite in the results dir).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def run(method, dataset, source_site, target_sites, setting, seed, steps, batch_size, params, arch_params, epochs,
        device, results, tracking_uri, quiet) -> None:
    """Adapt a source model to every target site of a protocol and report Dice recovery.

    Generates synthetic data and trains the source model on first use (both cached), adapts on each
    target site, prints a table per site and logs everything to MLflow.
    """
    from medtta.engine import RunConfig
    from medtta.engine import run as run_protocol
    from medtta.protocol import resolve_protocol
    from medtta.report import summary_table

    for noisy in ("mlflow", "alembic"):  # their INFO lines (store migrations) would bury our output; MLflow
        logging.getLogger(noisy).setLevel(logging.WARNING)  # sets its level on import, so after the imports
    protocol = resolve_protocol(dataset, source_site, tuple(target_sites))
    config = RunConfig(method=method, setting=setting, seed=seed, steps=steps, batch_size=batch_size,
                       hparams=parse_params(params), arch_config=parse_params(arch_params, "--arch-param"),
                       device=device, results=results, tracking_uri=tracking_uri,
                       epochs=epochs, progress=not quiet)
    result = run_protocol(protocol, config)
    click.echo(f"\n{method} on {protocol.name} ({protocol.modality}, {result.setting}, seed {seed}), "
               f"source site {protocol.source_site}")
    click.echo(summary_table(result))
    click.echo(f"\nMLflow run {result.run_id} in {result.tracking_uri}")
    if result.tracking_uri.startswith("sqlite:///"):
        click.echo(f"  view it:  mlflow ui --backend-store-uri {result.tracking_uri}")
    click.echo(f"Per-case tables: {result.results}")


@main.group("list")
def list_() -> None:
    """List what is available."""


def _echo_table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last one runs free."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)] if rows else []
    for row in rows:
        click.echo("  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip())


@list_.command("adapters")
@click.argument("pattern", default="*")
def list_adapters(pattern: str) -> None:
    """Adaptation methods with their paradigm (input, feature, output or prior, as in the MedSeg-TTA benchmark),
    the source architecture they adapt and what they do (optionally filtered by an fnmatch PATTERN such as 'ttt*').
    """
    from medtta.registry import ADAPTERS

    rows = [("METHOD", "PARADIGM", "ARCHITECTURE", "DESCRIPTION")]
    for name in ADAPTERS.list(pattern):
        cls = ADAPTERS.get(name)
        rows.append((name, cls.paradigm, cls.architecture, ADAPTERS.describe(name)))
    _echo_table(rows)


@list_.command("architectures")
@click.argument("pattern", default="*")
def list_architectures(pattern: str) -> None:
    """Source architectures, their config (set with `medtta run -a KEY=VALUE`) and the methods that adapt them."""
    from medtta.registry import ADAPTERS, ARCHITECTURES

    rows = [("ARCHITECTURE", "METHODS", "CONFIG", "DESCRIPTION")]
    for name in ARCHITECTURES.list(pattern):
        cls = ARCHITECTURES.get(name)
        methods = [m for m in ADAPTERS.list() if ADAPTERS.get(m).architecture == name]
        config = " ".join(f"{k}={v}".replace(" ", "") for k, v in cls.defaults.items()) or "-"
        rows.append((name, ",".join(methods) or "-", config, ARCHITECTURES.describe(name)))
    _echo_table(rows)


@list_.command("protocols")
def list_protocols() -> None:
    """Built-in cross-site protocols."""
    from medtta.protocol import list_protocols as protocols

    found = protocols()
    width = max((len(n) for n in found), default=0)
    for name, p in found.items():
        click.echo(f"{name.ljust(width)}  {p.modality:<4} {p.source_site} -> {', '.join(p.target_sites)}  "
                   f"{p.description}")


@main.group()
def data() -> None:
    """Prepare, check and verify datasets in the medtta layout."""


@data.command("prepare")
@click.argument("name")
@click.option("--from", "download", required=True, type=click.Path(path_type=Path),
              help="The dataset as downloaded (its official layout).")
@click.option("--to", "out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: $MEDTTA_DATA/NAME).")
@click.option("--sites", type=click.Path(dir_okay=False, path_type=Path),
              help="CSV telling each case's site: case_id,site[,split] for nnunet; the scanner metadata CSV "
                   "for amos when it is not inside the download folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def data_prepare(name: str, download: Path, out: Path | None, sites: Path | None, quiet: bool) -> None:
    """Convert dataset NAME from its official download layout into the medtta layout.

    NAME is a recipe: mnms, prostate, cc359, retouch, amos, or nnunet (any nnU-Net raw dataset plus a
    --sites CSV). Writes dataset.json, sites.csv, imagesTr/, labelsTr/ and a manifest.csv with the sha256 of every
    file. Re-running skips the cases already converted.
    """
    from medtta.data.recipes import get_recipe, prepare
    from medtta.paths import data_root

    recipe = get_recipe(name, **({"sites": sites} if sites else {}))
    target = out or data_root() / name
    counts = prepare(recipe, download, target, progress=not quiet)
    click.echo(f"{name}: {counts['cases']} cases in {target} ({counts['written']} written, "
               f"{counts['skipped']} already there) in {counts['seconds']:.1f} s")


@data.command("check")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def data_check(folder: Path, quiet: bool) -> None:
    """Check a dataset FOLDER in the medtta layout; lists every problem with its file (exit code 2 if any)."""
    from medtta.data.checks import check_dataset

    problems = check_dataset(folder, progress=not quiet)
    _report_problems(problems, f"{folder}: OK, every case readable and consistent")


@data.command("verify")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--protocol", "protocol_name", required=True, help="Protocol whose case list to compare against.")
def data_verify(folder: Path, protocol_name: str) -> None:
    """Compare prepared data in FOLDER with a protocol's expected case ids (and checksums where fixed)."""
    from medtta.data.checks import verify_dataset
    from medtta.protocol import resolve_protocol

    problems = verify_dataset(folder, resolve_protocol(protocol_name))
    _report_problems(problems, f"{folder}: matches protocol '{protocol_name}'")


def _report_problems(problems: list[str], ok: str) -> None:
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        click.echo(f"{len(problems)} problem(s) found", err=True)
        sys.exit(2)
    click.echo(ok)


main.add_command(export)
main.add_command(site_eval)
