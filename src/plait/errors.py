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


class DescriptionError(ConfigError):
    """A model description that does not fit its model (or the layout asked of it).

    The message names the part of the description, its value and the reason, e.g.
    ``model description blocks[2]=(2, 16, 48): a block must map hidden (2, 16, 32) to the same shape``.
    """

    def __init__(self, part: str, value: object, reason: str):
        super().__init__(f"model description {part}", value, reason)
