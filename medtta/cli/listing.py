"""`medtta list`: what is registered."""

from __future__ import annotations

import click


@click.group("list")
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
    the source architecture they adapt, the networks they adapt (DIMS: 2D slices, 3D volumes), the search space
    `medtta bench --sweep METHOD` tries and what they do (optionally filtered by an fnmatch PATTERN such as 'ttt*').
    """
    from medtta.registry import ADAPTERS

    rows = [("METHOD", "PARADIGM", "ARCHITECTURE", "DIMS", "SWEEP", "DESCRIPTION")]
    for name in ADAPTERS.list(pattern):
        cls = ADAPTERS.get(name)
        sweep = " ".join(f"{k}={','.join(map(str, v))}" for k, v in cls.sweep_space().items()) or "-"
        rows.append((name, cls.paradigm, ",".join(cls.architectures()), ",".join(map(str, cls.spatial_dims)), sweep,
                     ADAPTERS.describe(name)))
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
    """Built-in cross-site protocols."""
    from medtta.protocol import list_protocols as protocols

    found = protocols()
    width = max((len(n) for n in found), default=0)
    for name, p in found.items():
        click.echo(f"{name.ljust(width)}  {p.modality:<4} {p.source_site} -> {', '.join(p.target_sites)}  "
                   f"{p.description}")
