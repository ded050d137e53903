"""Option parsing and options shared by the commands."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import click
import yaml

from medtta.streams import DEFAULT_RAMP, DEFAULT_ROUNDS


def parse_params(values: tuple[str, ...], option: str = "--param") -> dict:
    """`KEY=VALUE` options as a dict, each value read as YAML (numbers, booleans, lists)."""
    params = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"'{item}' is not KEY=VALUE", param_hint=option)
        value = yaml.safe_load(raw)
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            params[key] = float(value) if isinstance(value, str) else value
        except ValueError:
            params[key] = value
    return params


def parse_method_params(values: tuple[str, ...]) -> dict[str, dict]:
    """`METHOD.KEY=VALUE` options grouped by method."""
    grouped: dict[str, dict] = {}
    for item in values:
        method, dot, rest = item.partition(".")
        if not dot or "=" not in rest:
            raise click.BadParameter(f"'{item}' is not METHOD.KEY=VALUE", param_hint="--param")
        grouped.setdefault(method, {}).update(parse_params((rest,)))
    return grouped


def parse_sweeps(values: tuple[str, ...]) -> dict[str, dict[str, tuple]]:
    """`--sweep METHOD.KEY=V1,V2,...` as {METHOD: {KEY: values}} (each value read as YAML); `--sweep METHOD` and
    `--sweep all` as {NAME: {}}: the method's declared search space, every method's."""
    sweeps: dict[str, dict[str, tuple]] = {}
    for item in values:
        name, eq, raw = item.partition("=")
        method, dot, key = name.partition(".")
        if bool(eq) != bool(dot) or (eq and not (method and key and raw)) or not method:
            raise click.BadParameter(f"'{item}' is not METHOD.KEY=V1,V2,..., METHOD or all", param_hint="--sweep")
        keys = sweeps.setdefault(method, {})
        if eq:
            keys[key] = tuple(parse_params((f"{key}={v}",), "--sweep")[key] for v in raw.split(","))
    return sweeps


def quiet_mlflow() -> None:
    """MLflow's and alembic's INFO lines (store migrations) would bury our output; MLflow sets its level on
    import, so call this after importing it."""
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _apply(options: list[Callable]) -> Callable:
    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


RESULTS = click.option("--results", type=click.Path(file_okay=False, path_type=Path),
                       help="Results dir: models, caches, tables, MLflow store (default: $MEDTTA_RESULTS or "
                            "./medtta-results).")
TRACKING_URI = click.option("--tracking-uri",
                            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite in the results dir).")

#: what `medtta run` and `medtta bench` both vary besides methods, datasets, seeds and settings
engine_options = _apply([
    click.option("--steps", type=click.IntRange(min=0),
                 help="Adaptation iterations per volume in the episodic setting (default: each method's)."),
    click.option("--batch-size", type=click.IntRange(min=1),
                 help="Slices per batch, a batch never mixing volumes (default 32); with a 3D network, random "
                      "patches per update (default 2)."),
    click.option("--patch-updates", type=click.IntRange(min=1),
                 help="With a 3D network: updates per adaptation pass over a volume (default: as many as it takes "
                      "to draw as many random patches as the sliding windows that predict the volume, --batch-size "
                      "a step)."),
    click.option("--arch-param", "-a", "arch_params", multiple=True, metavar="KEY=VALUE",
                 help="Source-architecture config, e.g. -a dae_epochs=20, -a spatial_dims=3 (a 3D network on "
                      "volumes; default: the protocol's dims), -a norm=group (see `medtta list architectures`); "
                      "repeatable. Part of the source model's cache key."),
    click.option("--epochs", type=click.IntRange(min=1), help="Source-training epochs (default: the protocol's)."),
    click.option("--include-source-site", "source_site_check", is_flag=True,
                 help="Also adapt on the source site's own test cases, as a separate stream, and report the Dice "
                      "change there (source-site harm)."),
    click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
                 help="auto uses CUDA when present."),
    click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]),
                 help="Of source training, adaptation and inference: bf16/fp16 run under torch autocast (fp16 with "
                      "a gradient scaler; a model trained in another precision is another cached model); fp32 uses "
                      "TF32 matmuls on CUDA. A run param: another precision is another cell."),
    click.option("--rounds", default=DEFAULT_ROUNDS, show_default=True, type=click.IntRange(min=1),
                 help="Passes over the target sites in the recurring setting (recovery per round and its slope)."),
    click.option("--site-order", default="fixed", show_default=True, metavar="fixed|shuffled:N",
                 help="fixed: the protocol's site order; shuffled:N: the continual, recurring and gradual streams run "
                      "over N seeded site orders (reset before each) and their figures are means over the orders."),
    click.option("--shuffle-within-site", is_flag=True,
                 help="Each site's volumes in a seeded order (default: case order). A run param."),
    click.option("--ramp", default=DEFAULT_RAMP, show_default=True, type=click.IntRange(min=0),
                 help="gradual: volumes over which one site's stream turns into the next's."),
    RESULTS,
    TRACKING_URI,
    click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
])

#: `--setting`'s help, shared by `medtta run` and `medtta bench`
SETTING_HELP = ("episodic: reset per volume, adapt then predict; continual: the target sites one after another, "
                "predict then update, never reset; per-site: reset when the site changes, online within it; mixed: "
                "every target volume in one seeded shuffled stream; recurring: the continual stream --rounds times; "
                "gradual: the continual stream ramping from each site into the next over --ramp volumes. Any method "
                "takes -p reset_every=N in the online settings: a reset every N volumes (RDumb's baseline).")
