"""`medtta run`: one method on one protocol."""

from __future__ import annotations

from pathlib import Path

import click

from medtta.cli.options import SETTING_HELP, engine_options, parse_params, quiet_mlflow
from medtta.streams import SETTINGS


@click.command()
@click.option("--method", "-m", required=True, help="Adaptation method (see `medtta list adapters`).")
@click.option("--dataset", "-d", required=True,
              help="A protocol name (see `medtta list protocols`), a protocol YAML file, or a dataset folder "
                   "in the medtta layout (then --source-site is required).")
@click.option("--source-site", help="Site the source model is trained on (default: the protocol's).")
@click.option("--target-site", "target_sites", multiple=True,
              help="Target site to adapt to; repeatable (default: every other site, in protocol order).")
@click.option("--setting", type=click.Choice(SETTINGS), help=SETTING_HELP + " Default: the protocol's (episodic).")
@click.option("--seed", default=0, show_default=True, type=int, help="Fixes source training and adaptation.")
@click.option("--architecture", help="Source architecture the method adapts, when it adapts several (see `medtta list "
                                     "architectures`; default: the method's first, or the one --checkpoint fits).")
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path),
              help="Pretrained weights the architecture starts from: a SAM or MedSAM .pth or .safetensors (same as "
                   "-a checkpoint=PATH), or a trained nnU-Net v2 results folder of one configuration, e.g. "
                   ".../nnUNetTrainer__nnUNetPlans__3d_fullres (--architecture nnunet; -a fold=N, "
                   "-a checkpoint=final|best). Nothing is downloaded.")
@engine_options
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
              help="Method hyper-parameter, e.g. -p lr=1e-4; repeatable.")
@click.option("--rerun", is_flag=True,
              help="Run again though an identical run (same method, params, seed and data) finished in the store; "
                   "without it, that run's results are printed.")
def run(method, dataset, source_site, target_sites, setting, seed, architecture, checkpoint, steps, batch_size,
        patch_updates, params, arch_params, epochs, source_site_check, device, precision, rounds, site_order,
        shuffle_within_site, ramp, results, tracking_uri, quiet, rerun) -> None:
    """Adapt a source model to every target site of a protocol and report Dice recovery.

    Generates synthetic data and trains the source model on first use (both cached), adapts on each
    target site, prints a table per site and logs everything to MLflow.
    """
    from medtta.protocol import resolve_protocol
    from medtta.registry import ADAPTERS

    protocol = resolve_protocol(dataset, source_site, tuple(target_sites))
    ADAPTERS.check(method)  # both before the heavy imports (torch, MONAI, MLflow: seconds): a typo fails at once

    from medtta.engine import RunConfig
    from medtta.engine import run as run_protocol
    from medtta.paths import results_root
    from medtta.report import cost_line, recovery_notes, source_site_line, store_args, summary_table

    quiet_mlflow()
    arch_config = parse_params(arch_params, "--arch-param")
    if checkpoint is not None and checkpoint.is_dir():  # an nnU-Net results folder
        arch_config["model_folder"] = str(checkpoint.resolve())
        architecture = architecture or "nnunet"
    elif checkpoint is not None:
        from medtta.models.sam import checkpoint_architecture

        arch_config["checkpoint"] = str(checkpoint)
        architecture = architecture or checkpoint_architecture(checkpoint)
    config = RunConfig(method=method, setting=setting, seed=seed, steps=steps, batch_size=batch_size,
                       patch_updates=patch_updates, hparams=parse_params(params), arch_config=arch_config,
                       architecture=architecture, device=device, results=results, tracking_uri=tracking_uri,
                       epochs=epochs, progress=not quiet, source_site_check=source_site_check, precision=precision,
                       rounds=rounds, site_order=site_order, rerun=rerun,
                       shuffle_within_site=shuffle_within_site, ramp=ramp)
    result = run_protocol(protocol, config)
    if result.reused:
        click.echo(f"\nAlready finished: MLflow run {result.run_id}, the same method, params, seed and data; its "
                   "results follow (--rerun runs it again).")
    elif result.data_changed:
        click.echo("\nThe data changed since this run last finished (a file's contents or the split): it ran again.")
    click.echo(f"\n{method} on {protocol.name} ({protocol.modality}, {result.setting}, seed {seed}), "
               f"source site {protocol.source_site}")
    click.echo(summary_table(result))
    for line in recovery_notes(result):
        click.echo(line)
    click.echo(cost_line(result))
    if result.source_site is not None:
        click.echo(f"\n{source_site_line(result.source_site)}")
    click.echo(f"\nMLflow run {result.run_id} in {result.tracking_uri}")
    click.echo(f"Per-case tables: {result.results}")
    click.echo(f"  view it:  medtta ui {store_args(result.tracking_uri, results_root(results))}")
