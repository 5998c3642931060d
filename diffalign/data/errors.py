"""The error every data reader raises for input it cannot use (a leaf module, so the readers, the labelling tool
and the sampling commands share it without importing each other)."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset that cannot be read as preference pairs; the message names the file, row or column."""
