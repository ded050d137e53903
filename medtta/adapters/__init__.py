"""Test-time adaptation methods, one module each, registered through the `medtta.adapters` entry points."""

from medtta.adapters.base import Adapter

__all__ = ["Adapter"]
