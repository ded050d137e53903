"""`medtta` command line."""

from __future__ import annotations

import sys
import warnings

import click

from medtta import __version__
from medtta.cli.bench import bench
from medtta.cli.data import data
from medtta.cli.listing import list_
from medtta.cli.report import report
from medtta.cli.run import run
from medtta.cli.site import export, site_eval
from medtta.cli.ui import ui
from medtta.errors import MedttaError, MedttaWarning


class MedttaGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 2, and Ctrl-C into exit code 130, without a traceback;
    prints our warnings as one line too."""

    def invoke(self, ctx: click.Context):
        with warnings.catch_warnings():  # restores the filters and printer when the command ends
            warnings.simplefilter("always", MedttaWarning)
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except MedttaError as err:
                click.echo(f"Error: {err}", err=True)
                sys.exit(2)
            except KeyboardInterrupt:
                click.echo("\nInterrupted: the run in progress is marked KILLED in MLflow; finished runs and cached "
                           "models are kept.", err=True)
                sys.exit(130)


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


main.add_command(run)
main.add_command(bench)
main.add_command(report)
main.add_command(list_)
main.add_command(data)
main.add_command(export)
main.add_command(site_eval)
main.add_command(ui)
