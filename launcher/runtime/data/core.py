"""The few names every data module shares: the ignore label, the user-facing error, an example."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


class DataError(Exception):
    """A problem with the data the user can fix; the message is one line naming the file or key."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
