"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class PlaitError(Exception):
    """An input the user can correct: bad config, missing data, unsupported layout."""


class ConfigError(PlaitError):
    """A configuration field holds a value that is not allowed.

    The message always names the field, the value and what would be valid.
    """

    def __init__(self, field: str, value: object, valid: str):
        self.field, self.value, self.valid = field, value, valid
        super().__init__(f"{field}={value!r}: {valid}")
