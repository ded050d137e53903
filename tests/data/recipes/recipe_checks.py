"""Checks shared by the recipe tests: run `medtta data prepare` through the CLI and judge what it wrote or said.

Imported as `from recipe_checks import ...`: pytest's default (prepend) import mode puts this folder on sys.path.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from click.testing import CliRunner, Result

from medtta.cli.main import main
from medtta.data.layout import sha256


def prepare(recipe: str, download: Path, out: Path, *extra: str) -> Result:
    """Run `medtta data prepare RECIPE --from DOWNLOAD --to OUT -q [EXTRA...]` and return click's result."""
    return CliRunner().invoke(main, ["data", "prepare", recipe, "--from", str(download), "--to", str(out), "-q",
                                     *extra])


def assert_prepared(result: Result, recipe: str, n: int) -> None:
    """The run succeeded and reported all `n` cases of `recipe` as newly written."""
    assert result.exit_code == 0, result.output
    assert f"{recipe}: {n} cases" in result.stdout and f"({n} written, 0 already there)" in result.stdout, \
        result.output


def read_sites(out: Path) -> list[list[str]]:
    """sites.csv as written: its rows as lists of strings, the header first."""
    with (out / "sites.csv").open(newline="") as fh:
        return list(csv.reader(fh))


def assert_one_line_error(result: Result, *fragments: str) -> None:
    """The run failed with exit code 2 and a single `Error: ` line on stderr (besides any `Warning: ` lines) holding
    every fragment, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("Warning: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_manifest_matches(out: Path, expected_ids: Iterable[str], *, ordered: bool = True) -> list[dict[str, str]]:
    """manifest.csv lists `expected_ids` (in that order unless `ordered` is false) with the sha256 of every file."""
    with (out / "manifest.csv").open(newline="") as fh:
        manifest = list(csv.DictReader(fh))
    ids, expected = [r["case_id"] for r in manifest], list(expected_ids)
    if ordered:
        assert ids == expected
    else:
        assert sorted(ids) == sorted(expected)
    for row in manifest:
        assert sha256(out / row["image"]) == row["image_sha256"], row["image"]
        assert sha256(out / row["label"]) == row["label_sha256"], row["label"]
    return manifest


def assert_check_passes(out: Path) -> None:
    """`medtta data check OUT -q` finds no problem and says OK."""
    check = CliRunner().invoke(main, ["data", "check", str(out), "-q"])
    assert check.exit_code == 0 and "OK" in check.output, check.output


def assert_rerun_skips(recipe: str, download: Path, out: Path, n: int) -> None:
    """Preparing again into `out` writes nothing and finds all `n` cases already there."""
    again = prepare(recipe, download, out)
    assert again.exit_code == 0 and f"(0 written, {n} already there)" in again.stdout, again.output
