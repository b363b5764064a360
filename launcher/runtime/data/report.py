"""The cleaning report: what happened to the rows of each data set, and the mix. Printed by
`prepare`, `run` and `submit`, stored in the cache's meta.json and in the run directory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launcher.runtime.data.core import DataError


@dataclass
class CleanReport:
    name: str = ""
    read: int = 0
    empty: int = 0
    duplicates: int = 0
    too_long: int = 0
    truncated: int = 0
    untrainable: int = 0  # nothing left to learn (e.g. the answer truncated away)
    val_overlap: int = 0  # validation rows also in the training rows, dropped from validation
    val: int = 0
    kept: int = 0  # training documents
    mixed: int = 0  # documents this set gives one epoch of the mix

    @property
    def dropped(self) -> int:
        return self.empty + self.duplicates + self.too_long + self.untrainable

    def line(self) -> str:
        name = f"{self.name}: " if self.name else ""
        return (
            f"data: {name}read {self.read}, dropped {self.empty} empty, {self.duplicates} duplicate, "
            f"{self.too_long} over-long, {self.untrainable} with nothing to learn; truncated {self.truncated}; "
            f"validation {self.val}; kept {self.kept}"
        )


def check_dropped(report: CleanReport, limit: float, max_seq_len: int) -> None:
    """Too many rows dropped is a mistake in the settings, not a data set: say which and how to fix it."""
    if report.read == 0:
        raise DataError(f"{report.name}: has no rows; check data.path and data.split")
    if report.dropped <= limit * report.read:
        return
    causes = {
        "empty": (report.empty, "check that data.columns names the columns that hold the text"),
        "duplicate": (
            report.duplicates,
            "the template's columns repeat: map every column it needs (data.columns), or set data.dedup: false",
        ),
        "over-long": (report.too_long, f"raise data.max_seq_len (now {max_seq_len}) or set data.drop_longer: false to truncate"),
        "with nothing to learn": (report.untrainable, "raise data.max_seq_len, or check the response column"),
    }
    worst = max(causes, key=lambda k: causes[k][0])
    parts = ", ".join(f"{n} {k}" for k, (n, _) in causes.items() if n)
    raise DataError(
        f"{report.name}: {report.dropped} of {report.read} rows dropped ({100 * report.dropped / report.read:.0f}%: {parts}), "
        f"more than data.max_dropped_fraction={limit:g}; {causes[worst][1]} (or raise data.max_dropped_fraction)"
    )


def lines(meta: dict[str, Any]) -> list[str]:
    """The report as printed: one line per data set, one for the mix."""
    reports = [CleanReport(**r) for r in meta.get("sources", [])]
    out = [r.line() for r in reports]
    total = sum(r.mixed for r in reports)
    train = meta.get("train", {})
    if len(reports) > 1 and total:
        mix = ", ".join(f"{r.name} {100 * r.mixed / total:.1f}% ({r.mixed})" for r in reports)
        out.append(f"data: mix per epoch: {mix} documents")
    if train:
        out.append(f"data: {train['documents']} training documents in {train['rows']} rows, {train['tokens']} tokens")
    return out
