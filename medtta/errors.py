"""Errors caused by the user's input: the CLI prints them as one line and exits with code 2. Warnings about
it (`MedttaWarning`) are printed as one line and the command goes on."""

from __future__ import annotations


class MedttaError(Exception):
    """A user-facing error: the message names the file or option and what is wrong."""


class DataError(MedttaError):
    """A dataset folder, case file or label map is missing or malformed."""


class ProtocolError(MedttaError):
    """A protocol file is missing, unknown or malformed."""


class RegistryError(MedttaError, KeyError):
    """An adapter name or hyper-parameter is unknown."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MedttaWarning(UserWarning):
    """Something the user should know about their data or protocol that does not stop the command."""
