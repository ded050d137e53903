"""`medtta data`: prepare, check and verify datasets."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group()
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
