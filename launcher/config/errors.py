"""The one error type the config and plan layers raise: a list of lines for people."""

from __future__ import annotations

import re
from dataclasses import dataclass

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """Control characters escaped (`\\n`, `\\x1b`): a hostile key or value cannot break the line."""
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], text)


@dataclass(frozen=True)
class Problem:
    key: str  # dotted key path, e.g. "parallel.zero_stage"
    what: str  # what is wrong
    fix: str  # how to fix it

    def line(self) -> str:
        return one_line(f"error: {self.key}: {self.what}; {self.fix}")


class ConfigError(Exception):
    """One or more problems with a recipe; `str()` is one line per problem."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(p.line() for p in self.problems))

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.problems]
