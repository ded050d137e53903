"""Dataset recipes, one module per real dataset: official download layout -> medtta dataset layout."""

from __future__ import annotations

import importlib
from typing import Any

from medtta.data.recipes.base import Recipe, prepare
from medtta.errors import DataError

# name -> "module:class", imported on use so that one recipe's import cost is not everyone's
RECIPES: dict[str, str] = {
    "mnms": "medtta.data.recipes.mnms:MnMsRecipe",
    "prostate": "medtta.data.recipes.prostate:ProstateRecipe",
    "cc359": "medtta.data.recipes.cc359:CC359Recipe",
    "retouch": "medtta.data.recipes.retouch:RetouchRecipe",
    "amos": "medtta.data.recipes.amos:AmosRecipe",
    "nnunet": "medtta.data.recipes.nnunet:NnUNetRecipe",
}


def recipe_class(name: str) -> type[Recipe]:
    """The recipe class registered under `name`."""
    if name not in RECIPES:
        raise DataError(f"unknown dataset recipe '{name}' (available: {', '.join(sorted(RECIPES))})")
    module, _, cls = RECIPES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def get_recipe(name: str, **options: Any) -> Recipe:
    """An instance of the recipe `name`, with recipe-specific options (e.g. `sites` for nnunet)."""
    return recipe_class(name)(**options)


__all__ = ["RECIPES", "Recipe", "get_recipe", "prepare", "recipe_class"]
