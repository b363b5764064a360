"""The cleaning report: what happened to the rows of each data set, and the mix. Printed by
`prepare`, `run` and `submit`, stored in the cache's meta.json and in the run directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from launcher.runtime.data.core import DataError

# Row problems kept for the report and a refusal: the first few, each "row N: why".
FIRST_PROBLEMS = 3


@dataclass
class CleanReport:
    """Every row read lands in exactly one count: read == missing + empty + invalid + duplicates +
    too_long + untrainable + val_overlap + val + kept (`accounted`), for the training set (its held-out
    rows included) and for a separate validation set alike."""

    name: str = ""
    read: int = 0
    missing: int = 0  # a column the template needs is absent or null
    empty: int = 0  # present, but nothing to train on (blank text, no assistant turn)
    invalid: int = 0  # cannot be read: bad UTF-8 or JSON, a wrong type, a role or part we cannot use, a template's refusal
    problems: list[str] = field(default_factory=list)  # the first invalid rows, "row N: why"
    duplicates: int = 0
    identical: int = 0  # preference pairs whose chosen and rejected responses are the same tokens
    too_long: int = 0
    truncated: int = 0
    untrainable: int = 0  # nothing left to learn (e.g. the answer truncated away)
    val_overlap: int = 0  # validation rows also in the training rows, dropped from validation
    val: int = 0
    kept: int = 0  # training documents
    mixed: int = 0  # documents this set gives one epoch of the mix

    @property
    def dropped(self) -> int:
        return self.missing + self.empty + self.invalid + self.duplicates + self.identical + self.too_long + self.untrainable

    @property
    def accounted(self) -> int:
        return self.dropped + self.val_overlap + self.val + self.kept

    def add_problems(self, count: int, first: list[tuple[int, str]]) -> None:
        """Count `count` invalid rows; keep the first few, by row, of `first` ((0-based row, why), sorted)."""
        self.invalid += count
        known = [(int(p.split(":", 1)[0].removeprefix("row ")) - 1, p.split(": ", 1)[1]) for p in self.problems]
        self.problems = [f"row {row + 1}: {why}" for row, why in sorted([*known, *first[:FIRST_PROBLEMS]])[:FIRST_PROBLEMS]]

    def line(self) -> str:
        name = f"{self.name}: " if self.name else ""
        missing = f"{self.missing} missing, " if self.missing else ""
        invalid = f"{self.invalid} invalid ({'; '.join(self.problems)}), " if self.invalid else ""
        overlap = f"{self.val_overlap} validation rows also in training, " if self.val_overlap else ""
        overlap += f"{self.identical} with chosen = rejected, " if self.identical else ""
        return (
            f"data: {name}read {self.read}, dropped {missing}{self.empty} empty, {invalid}{self.duplicates} duplicate, "
            f"{self.too_long} over-long, {overlap}{self.untrainable} with nothing to learn; truncated {self.truncated}; "
            f"validation {self.val}; kept {self.kept}"
        )


def check_dropped(report: CleanReport, limit: float, max_seq_len: int) -> None:
    """Too many rows dropped is a mistake in the settings, not a data set: say which and how to fix it."""
    if report.read == 0:
        raise DataError(f"{report.name}: has no rows; check data.path and data.split")
    if report.dropped <= limit * report.read:
        return
    first = report.problems[0] if report.problems else ""
    causes = {
        "missing": (report.missing, "check that data.columns names the columns that hold the text"),
        "empty": (report.empty, "check that data.columns names the columns that hold the text"),
        "invalid": (report.invalid, f"fix or remove those rows ({first})"),
        "duplicate": (
            report.duplicates,
            "the template's columns repeat: map every column it needs (data.columns), or set data.dedup: false",
        ),
        "chosen = rejected": (report.identical, "check that data.columns maps chosen and rejected to different columns"),
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
    out = [r.line() for r in reports] + [CleanReport(**r).line() for r in meta.get("val_sources", [])]
    total = sum(r.mixed for r in reports)
    train = meta.get("train", {})
    if len(reports) > 1 and total:
        mix = ", ".join(f"{r.name} {100 * r.mixed / total:.1f}% ({r.mixed})" for r in reports)
        out.append(f"data: mix per epoch: {mix} documents")
    if train:
        out.append(f"data: {train['documents']} training documents in {train['rows']} rows, {train['tokens']} tokens")
    return out
