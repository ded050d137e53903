"""`medtta list`: what is registered."""

from __future__ import annotations

import click


@click.group("list")
def list_() -> None:
    """List what is available."""


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell; the last one runs free."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)] if rows else []
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip()
            for row in rows]


def _echo_table(rows: list[tuple[str, ...]]) -> None:
    for line in _table(rows):
        click.echo(line)


@list_.command("adapters")
@click.argument("pattern", default="*")
def list_adapters(pattern: str) -> None:
    """Adaptation methods with their paradigm (input, feature, output or prior, as in the MedSeg-TTA benchmark),
    the source architecture they adapt, the networks they adapt (DIMS: 2D slices, 3D volumes; NORMS: the `-a norm`
    values, '-' for an architecture without one), the search space `medtta bench --sweep METHOD` tries and what they
    do (optionally filtered by an fnmatch PATTERN such as 'ttt*').
    """
    from medtta.registry import ADAPTERS, ARCHITECTURES

    rows = [("METHOD", "PARADIGM", "ARCHITECTURE", "DIMS", "NORMS", "SWEEP", "DESCRIPTION")]
    for name in ADAPTERS.list(pattern):
        cls = ADAPTERS.get(name)
        sweep = ";".join(f"{k}={','.join(map(str, v))}" for k, v in cls.sweep_space().items()) or "-"
        norms = ",".join(cls.norms) if "norm" in ARCHITECTURES.get(cls.architecture).defaults else "-"
        rows.append((name, cls.paradigm, ",".join(cls.architectures()), ",".join(map(str, cls.spatial_dims)), norms,
                     sweep, ADAPTERS.describe(name)))
    _echo_table(rows)


@list_.command("architectures")
@click.argument("pattern", default="*")
def list_architectures(pattern: str) -> None:
    """Source architectures, their config (set with `medtta run -a KEY=VALUE`) and the methods that adapt them."""
    from medtta.registry import ADAPTERS, ARCHITECTURES

    rows = [("ARCHITECTURE", "METHODS", "CONFIG", "DESCRIPTION")]
    for name in ARCHITECTURES.list(pattern):
        cls = ARCHITECTURES.get(name)
        methods = [m for m in ADAPTERS.list() if name in ADAPTERS.get(m).architectures()]
        config = " ".join(f"{k}={v}".replace(" ", "") for k, v in cls.defaults.items()) or "-"
        rows.append((name, ",".join(methods) or "-", config, ARCHITECTURES.describe(name)))
    _echo_table(rows)


@list_.command("protocols")
def list_protocols() -> None:
    """Built-in cross-site protocols: modality, the dimensions the network runs in (DIMS; `-a spatial_dims=3` runs
    a 2D one on volumes), SPACING (mm, in-plane, '-' where slices are resized to the size instead; then between
    slices in 3D: 'median' when the source site's median is planned), PATCH (3D: in-plane then depth, 'planned'
    from the data; 2D: the slice size), source and target sites; each followed by its description, indented, so
    that lines stay short."""
    from medtta.protocol import list_protocols as protocols

    found = protocols()
    rows = [("PROTOCOL", "MODALITY", "DIMS", "SPACING", "PATCH", "SITES")]
    for name, p in found.items():
        prep = p.preprocessing
        spacing = "x".join(f"{v:g}" for v in prep.spacing) if prep.spacing else "-"
        if prep.dims == 3:
            spacing += "x" + (f"{prep.slice_spacing:g}" if prep.slice_spacing else "median")
            patch = "x".join(map(str, prep.patch_size)) if prep.patch_size else "planned"
        else:
            patch = "x".join(map(str, prep.size))
        sites = f"{p.source_site} -> {', '.join(p.target_sites)}"
        rows.append((name, p.modality, str(prep.dims), spacing, patch, sites))
    header, *lines = _table(rows)
    click.echo(header)
    indent = " " * (max(len(row[0]) for row in rows) + 2)  # under MODALITY
    for line, p in zip(lines, found.values(), strict=True):
        click.echo(line)
        click.echo(indent + p.description)
