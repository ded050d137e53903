"""`medtta bench`: the method x protocol x seed x setting grid."""

from __future__ import annotations

import sys

import click

from medtta.cli.options import (
    SETTING_HELP,
    engine_options,
    parse_method_params,
    parse_params,
    parse_sweeps,
    quiet_mlflow,
)


def _grouped_params(values: tuple[str, ...]) -> dict[str, dict]:
    """`-p METHOD.KEY=VALUE` by method, and `-p KEY=VALUE` (every method that has KEY) under ''."""
    scoped = tuple(v for v in values if "." in v.partition("=")[0])
    shared = tuple(v for v in values if v not in scoped)
    return {**parse_method_params(scoped), **({"": parse_params(shared)} if shared else {})}


@click.command()
@click.option("--methods", "-m", required=True,
              help="'all', or comma-separated methods and patterns, e.g. 'source,bn-stats,tent' or 'ttt-*'.")
@click.option("--datasets", "-d", required=True,
              help="Comma-separated protocols and patterns ('synth-*'), protocol YAML files or dataset folders "
                   "(with --source-site).")
@click.option("--seeds", default="0", show_default=True,
              help="Comma-separated seeds; each one trains its own source model.")
@click.option("--setting", default="episodic", show_default=True, metavar="all|SETTING[,SETTING...]",
              help="Settings to run each method in, comma-separated, or all. " + SETTING_HELP)
@click.option("--source-site", help="Source site of dataset folders given to --datasets.")
@click.option("--param", "-p", "params", multiple=True, metavar="[METHOD.]KEY=VALUE",
              help="Hyper-parameter of one method (-p tent.lr=1e-4) or of every method that has it (-p lr=1e-4); "
                   "repeatable.")
@click.option("--sweep", "sweeps", multiple=True, metavar="METHOD.KEY=V1,V2,... | METHOD | all",
              help="Hyper-parameters (or steps) to sweep: every combination of a method's values is its own cell "
                   "(tag medtta.config). METHOD sweeps its declared search space (the learning rate ×0.1, ×1, ×10 "
                   "unless it declares another, see `medtta list adapters`), all every method's; repeatable. "
                   "Choose among the configurations with `medtta report --select`.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Cells run at once, each in its own process with the CPU threads split between them.")
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: processes on this machine; ray: Ray tasks on the running cluster (or a local one), "
                   "GPU cells asking for a GPU. Needs pip install 'medtta[ray]'.")
@engine_options
def bench(methods, datasets, seeds, setting, source_site, params, sweeps, workers, executor, steps, batch_size,
          patch_updates, arch_params, epochs, source_site_check, device, precision, rounds, site_order,
          shuffle_within_site, ramp, results, tracking_uri, quiet) -> None:
    """Run every method on every protocol and seed (a grid of cells), as `medtta run` would, and summarize.

    Datasets are checked and source models trained (with their unadapted predictions) once, before any cell
    runs. Each cell is one parent run in MLflow; a cell already finished there is skipped, so re-running a
    killed or extended grid does only what is missing. A failed cell is reported and the grid goes on (exit
    code 1 at the end). `medtta report` then writes tables and figures, `medtta ui` opens MLflow.
    """
    from medtta.bench import (
        BenchConfig,
        method_params,
        select_methods,
        select_protocols,
        select_settings,
        summary_table,
        sweep_spaces,
    )
    from medtta.bench import bench as run_bench
    from medtta.engine import RunConfig
    from medtta.errors import MedttaError
    from medtta.report import store_args

    quiet_mlflow()
    try:
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        raise MedttaError(f"--seeds '{seeds}': expected comma-separated integers, e.g. 0,1,2") from None
    chosen = select_methods(methods)
    run = RunConfig(method="source", steps=steps, batch_size=batch_size, patch_updates=patch_updates,
                    arch_config=parse_params(arch_params, "--arch-param"), device=device, results=results,
                    tracking_uri=tracking_uri, epochs=epochs, source_site_check=source_site_check, precision=precision,
                    rounds=rounds, site_order=site_order, shuffle_within_site=shuffle_within_site, ramp=ramp)
    config = BenchConfig(methods=chosen, protocols=select_protocols(datasets, source_site), seeds=seed_list,
                         settings=select_settings(setting),
                         hparams=method_params(_grouped_params(params), chosen),
                         sweeps=sweep_spaces(parse_sweeps(sweeps), chosen), run=run, workers=workers,
                         executor=executor)
    result = run_bench(config, progress=not quiet, echo=click.echo)
    click.echo("\n" + summary_table(result))
    if source_site_check:
        click.echo("\n" + summary_table(result, "source_site_harm", "source-site harm"))
    counts = {s: sum(o.status == s for o in result.outcomes) for s in ("finished", "skipped", "failed", "running")}
    click.echo(f"\n{len(result.outcomes)} cell(s): {counts['finished']} run, {counts['skipped']} already finished, "
               f"{counts['failed']} failed, {counts['running']} running elsewhere; source models and unadapted "
               f"predictions {result.prepare_seconds:.0f} s, cells {result.cells_seconds:.0f} s")
    store = store_args(result.tracking_uri, result.results)
    click.echo(f"MLflow: {result.tracking_uri}\n  report:  medtta report {store}\n  browse:  medtta ui {store}")
    if counts["failed"]:
        sys.exit(1)
