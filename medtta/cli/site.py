"""`medtta export` and `medtta site-eval`: ship a model to a hospital and evaluate it there, offline."""

from __future__ import annotations

import time
from pathlib import Path

import click

from medtta.cli.options import parse_method_params, parse_params, quiet_mlflow


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@click.command()
@click.option("--dataset", "-d", required=True,
              help="A protocol name, a protocol YAML file or a dataset folder (as `medtta run` takes it).")
@click.option("--source-site", help="Site the source model is trained on (default: the protocol's; required with "
                                    "a dataset folder).")
@click.option("--architecture", default="unet", show_default=True,
              help="Source architecture to ship (see `medtta list architectures`); a bundle serves the methods "
                   "of its architecture only.")
@click.option("--arch-param", "-a", "arch_params", multiple=True, metavar="KEY=VALUE",
              help="Architecture config, as for `medtta run`; repeatable.")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A trained nnU-Net v2 results folder of one configuration to ship (--architecture nnunet; same as "
                   "-a model_folder=PATH).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the source model.")
@click.option("--epochs", type=click.IntRange(min=1), help="Source-training epochs (default: the protocol's).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Bundle folder to write.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--results", type=click.Path(file_okay=False, path_type=Path),
              help="Results dir holding the model cache (default: $MEDTTA_RESULTS or ./medtta-results).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def export(dataset, source_site, architecture, arch_params, checkpoint, seed, epochs, out, device, results,
           quiet) -> None:
    """Write a self-contained model bundle for hospital-site evaluation.

    Trains the source model if it is not cached, computes the source statistics every method of the architecture
    needs (EATA's Fisher information) and the in-domain Dice, and writes OUT/bundle.json and safetensors files.
    `medtta site-eval --model OUT` then needs no source data and no network.
    """
    from medtta.protocol import resolve_protocol
    from medtta.site.export import export_bundle

    protocol = resolve_protocol(dataset, source_site)
    arch_config = parse_params(arch_params, "--arch-param")
    if checkpoint is not None:
        arch_config["model_folder"], architecture = str(checkpoint.resolve()), "nnunet"
    manifest = export_bundle(protocol, out, architecture, seed, arch_config, epochs, device, results,
                             progress=not quiet)
    src = manifest["source"]
    stats = ", ".join(manifest["files"]["statistics"]) or "none"
    click.echo(f"Bundle {out}: {architecture} trained on site {src['site']} of {protocol.name} (seed {seed}), "
               f"in-domain Dice {src['dice_in_domain']:.3f} on {src['in_domain_cases']} case(s); source statistics: "
               f"{stats}; {_folder_size(out) / 1e6:.1f} MB")


@click.command("site-eval")
@click.option("--model", "-m", "model", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Bundle folder written by `medtta export`.")
@click.option("--data", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The site's volumes: a dataset-layout folder, or a folder of NIfTI (.nii, .nii.gz) and MetaImage "
                   "(.mha, .mhd) files and DICOM series (one series per subfolder). Only read.")
@click.option("--methods", default="source,bn-stats,tent", show_default=True,
              help="Comma-separated methods of the bundle's architecture; source (unadapted) is always included.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: masks/, cases.csv, summary.csv, skipped.csv, report.md, mlflow.db.")
@click.option("--labels", type=click.Path(file_okay=False, path_type=Path),
              help="Masks named like the images (default: the layout's labelsTr, else none: label-free only).")
@click.option("--site", help="Evaluate one site of a dataset-layout folder (default: every case).")
@click.option("--name", help="The site's name in the report and MLflow (default: the --data folder's name).")
@click.option("--setting", default="episodic", show_default=True, type=click.Choice(["episodic", "continual"]),
              help="episodic: each volume adapted from the exported model; continual: one stream of volumes.")
@click.option("--steps", type=click.IntRange(min=0), help="Adaptation iterations per volume (default: each method's).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Slices per batch.")
@click.option("--param", "-p", "params", multiple=True, metavar="METHOD.KEY=VALUE",
              help="A method's hyper-parameter, e.g. -p tent.lr=1e-4; repeatable.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="auto uses CUDA when present.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def site_eval(model, data, methods, output, labels, site, name, setting, steps, batch_size, params, seed, device,
              quiet) -> None:
    """Adapt a model bundle to a site's own scans with each method and report what it changes.

    With labels: Dice per label, HD95 and Dice recovery against the bundle's in-domain Dice. Without: label-free
    indicators (entropy, voxels changed against source, foreground volume against source, collapse flags).
    Writes each prediction as NIfTI with its input's geometry, CSVs, report.md and an MLflow store under
    --output. Offline: no network connection, nothing written under --data; unreadable inputs are reported and
    skipped.
    """
    from medtta.site.evaluate import disable_telemetry

    disable_telemetry()  # before MLflow loads
    from medtta.site.bundle import load_bundle
    from medtta.site.evaluate import SiteConfig, SiteEvaluation
    from medtta.site.report import console_summary, log_to_mlflow, write_outputs

    quiet_mlflow()
    config = SiteConfig(methods=tuple(m.strip() for m in methods.split(",") if m.strip()), output=output,
                        labels=labels, site=site, name=name, setting=setting, steps=steps, batch_size=batch_size,
                        hparams=parse_method_params(params), seed=seed, device=device, progress=not quiet)
    bundle = load_bundle(model)
    start = time.perf_counter()
    result = SiteEvaluation(bundle, data, config).run()
    write_outputs(result, bundle, data)
    uri = log_to_mlflow(result, bundle, {"setting": setting, "steps": steps, "batch_size": batch_size, "seed": seed},
                        config.hparams)
    click.echo(f"\nsite-eval of {bundle.architecture} bundle on {result.name}: "
               f"{int(max(s['cases'] for s in result.summary.values()))} volume(s), {len(result.skipped)} skipped, "
               f"{time.perf_counter() - start:.1f} s")
    click.echo(console_summary(result, bundle))
    click.echo(f"\nReport: {output / 'report.md'}  (masks in {output / 'masks'}, per-case rows in "
               f"{output / 'cases.csv'})")
    click.echo(f"MLflow: mlflow ui --backend-store-uri {uri}")
