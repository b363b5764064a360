"""Bounded reading of recipe files and override values: hostile input fails fast with one line.

A recipe is a small, hand-written file, so the limits are far above any real one and far below
what would hang or crash the reader: size, number of YAML nodes (the parser is pure Python, about
5 s per MB), nesting depth and the size after alias expansion (a "billion laughs" file is a few
hundred bytes), UTF-8 text only, and no key given twice in one mapping.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from launcher.config.errors import ConfigError, Problem
from launcher.config.validate import control_problem

MAX_BYTES = 1_000_000
MAX_EVENTS = 20_000  # YAML events (nodes and their ends); a shipped recipe has about 200
MAX_DEPTH = 32  # nesting levels, counted after alias expansion
MAX_EXPANDED = 20_000  # nodes after alias expansion

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(Exception):
    """A limit or rule the YAML broke; the message says which and where."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts events, limits nesting and refuses duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._events = 0
        self._depth = 0

    def get_event(self) -> Any:
        self._events += 1
        if self._events > MAX_EVENTS:
            raise _Refused(f"has more than {MAX_EVENTS} YAML nodes (a recipe has a few hundred)")
        return super().get_event()

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"is nested deeper than {MAX_DEPTH} levels at line {self.peek_event().start_mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _Refused(f"key {key!r} is given twice (lines {seen[key]} and {line}); the second would silently win")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _measure(root: Any) -> None:
    """Refuse recursive anchors and graphs whose alias expansion is too large or too deep.

    Iterative, with one entry per distinct node: a file of aliases to aliases costs its own size.
    """
    done: dict[int, tuple[int, int]] = {}  # id -> (expanded nodes, expanded depth)
    open_ids: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        kids = _children(node)
        if finished:
            size = 1 + sum(done[id(k)][0] for k in kids)
            depth = 1 + max((done[id(k)][1] for k in kids), default=0)
            if size > MAX_EXPANDED:
                raise _Refused(f"expands to more than {MAX_EXPANDED} values through aliases (line {node.start_mark.line + 1})")
            if depth > MAX_DEPTH:
                raise _Refused(f"is nested deeper than {MAX_DEPTH} levels through aliases (line {node.start_mark.line + 1})")
            done[id(node)] = (size, depth)
            open_ids.discard(id(node))
            continue
        if id(node) in done:
            continue
        if id(node) in open_ids:
            raise _Refused(f"has an alias that refers to itself (line {node.start_mark.line + 1})")
        open_ids.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in done)


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def parse_yaml(text: str, where: str) -> Any:
    """YAML text → Python data within the limits; ConfigError naming `where` otherwise."""
    try:
        loader = _BoundedLoader(text)  # the reader checks every character here, before any parsing
    except yaml.reader.ReaderError as exc:  # a control character, or a byte that was not UTF-8 (an override's)
        raise ConfigError(
            [
                Problem(
                    where,
                    f"contains U+{exc.character:04X} at character {exc.position}, which YAML does not allow "
                    "(a control character, or a byte that is not UTF-8)",
                    "remove it, or write it as an escape inside double quotes",
                )
            ]
        ) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node)
        return loader.construct_document(node)
    except _Refused as exc:
        raise ConfigError([Problem(where, str(exc), "simplify the YAML")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError([Problem(where, f"is not valid YAML{at} ({reason})", "fix the YAML syntax")]) from None
    except RecursionError:  # cannot happen within MAX_DEPTH; kept so that it can never be a traceback
        raise ConfigError([Problem(where, "is nested too deeply", "simplify the YAML")]) from None
    finally:
        loader.dispose()


def read_text(path: Path, key: str) -> str:
    """A recipe file's text: a regular file, at most MAX_BYTES, UTF-8 (a UTF-8 BOM is dropped)."""
    name = str(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError([Problem(key, f"{name} is not a regular file", "give a recipe YAML file")])
        if info.st_size > MAX_BYTES:
            raise ConfigError([Problem(key, f"{name} has {info.st_size} bytes, more than {MAX_BYTES}", "a recipe is a small YAML file")])
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError([Problem(key, f"cannot read {name} ({exc.strerror})", "check the path")]) from None
    if len(data) > MAX_BYTES:
        raise ConfigError([Problem(key, f"{name} has more than {MAX_BYTES} bytes", "a recipe is a small YAML file")])
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(data) >= 2 and (data[0] == 0) != (data[1] == 0)):
        raise ConfigError([Problem(key, f"{name} is UTF-16 or UTF-32 text", "save it as UTF-8")])
    if b"\x00" in data:
        raise ConfigError([Problem(key, f"{name} is a binary file (it contains NUL bytes)", "give a recipe YAML file")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [Problem(key, f"{name} is not UTF-8 (byte {exc.start} is 0x{data[exc.start]:02x})", "save it as UTF-8")]
        ) from None
    return text.removeprefix("\ufeff")


def parse_override_value(key: str, text: str) -> Any:
    """An override's value as YAML (so `4`, `true`, `[a, b]` work); raw control characters refused
    first, because YAML would silently fold a newline into a space."""
    problem = control_problem(key, text)
    if problem is not None:
        raise ConfigError([problem])
    if not text.strip():
        return ""
    try:
        return parse_yaml(text, key)
    except ConfigError as exc:
        if "is not valid YAML" in exc.problems[0].what:
            return text  # not YAML: the literal string (e.g. `gpu;rm -rf /`), checked like any value
        raise
