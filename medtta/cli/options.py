"""Option parsing shared by the commands."""

from __future__ import annotations

import click
import yaml


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
