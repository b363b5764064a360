"""The package versions this launcher was tested with, the ones installed here, and one line for each
package outside the tested range. No torch import: versions come from the installed packages' metadata.

The tested versions are the lock the suite last passed on (launcher/constraints-cpu.txt, written by
`make lock` / `make upgrade-deps`). A package's tested range is its locked release series: the same
major.minor, any patch (transformers 5.25.0 locked: 5.25.x is tested, 5.26.0 and 5.24.3 are not).
`launcher plan` records what it planned with (plan.json's `versions`); rank 0 and `launcher doctor`
compare what they import against both.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

LOCK = Path(__file__).with_name("constraints-cpu.txt")
LOCK_NAME = "launcher/constraints-cpu.txt"
# What a run's numerics and file formats depend on; the lock's other ~100 packages are their plumbing.
WATCHED = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface-hub",
    "kernels",
    "datasets",
    "accelerate",
    "peft",
    "bitsandbytes",
    "deepspeed",
    "omegaconf",
    "flash-attn",
    "liger-kernel",
)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical(name: str) -> str:
    """PEP 503 normalisation: `Huggingface_Hub` and `huggingface-hub` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, str]:
    """`name==version` lines of a pip constraints file (uv's output), by canonical name."""
    pins: dict[str, str] = {}
    for line in text.splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


@cache
def locked() -> dict[str, str]:
    """The tested versions; empty when the lock is not installed beside this module."""
    try:
        return parse_lock(LOCK.read_text())
    except OSError:
        return {}


def installed(names: Iterable[str] = WATCHED) -> dict[str, str]:
    """Installed version of each name that is installed (absent names are left out)."""
    found: dict[str, str] = {}
    for name in names:
        try:
            found[canonical(name)] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version: `2.13.0+cpu` -> (2, 13, 0), `5.0.0rc1` -> (5, 0, 0)."""
    parts = []
    for piece in version.split("+", 1)[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.group() != piece:  # 0rc1, 1.dev0: the pre-release ends the release number
            break
    return tuple(parts)


def series(version: str) -> str:
    """The release series a version belongs to, as shown to users: `5.25.0` -> `5.25.*`."""
    release = _release(version)
    return ".".join(map(str, release[:2])) + ".*" if len(release) >= 2 else version


def in_series(version: str, tested: str) -> bool:
    return _release(version)[:2] == _release(tested)[:2]


def untested(found: Mapping[str, str], tested: Mapping[str, str]) -> dict[str, str]:
    """Each installed package outside its tested series -> the tested version to install (without
    the wheel's local label: `2.13.0+cpu` -> `2.13.0`)."""
    return {name: tested[name].split("+")[0] for name, version in found.items() if name in tested and not in_series(version, tested[name])}


def outside_tested(found: Mapping[str, str], tested: Mapping[str, str], planned: Mapping[str, str] | None = None) -> list[str]:
    """One warning line per watched package outside its tested series, or (within it) not the
    version the run was planned with."""
    lines: list[str] = []
    outside = untested(found, tested)
    for name, version in found.items():
        was = (planned or {}).get(name)
        if name in outside:
            note = f"; planned with {was}" if was and was != version else ""
            lines.append(
                f"warning: {name} {version} is outside the tested range {series(outside[name])} ({LOCK_NAME}{note}); "
                f"if the run misbehaves, install the tested one: pip install '{name}=={outside[name]}'"
            )
        elif was is not None and was != version:
            lines.append(f"warning: {name} {version} here, {was} where the run was planned; plan and ranks should share one environment")
    return lines


def report() -> dict[str, str]:
    """What plan.json records: Python and each watched package installed where the plan was made."""
    return {"python": ".".join(map(str, sys.version_info[:3])), **installed()}


def warnings_for(planned: Mapping[str, str] | None = None) -> list[str]:
    """This process's out-of-range lines (rank 0 prints them at start; `launcher doctor` has its own
    check lines from `untested`)."""
    return outside_tested(installed(), locked(), {k: v for k, v in (planned or {}).items() if k != "python"})


def torchrun_flags_missing(argv: list[str]) -> list[str]:
    """The options of a torchrun argv (those before `-m SCRIPT`; the script's own come after) that
    this torch's torchrun does not know: a node with an older torch, found before any rank starts."""
    from torch.distributed.run import get_args_parser

    known = get_args_parser()._option_string_actions  # argparse's map of every option string
    own = argv[: argv.index("-m")] if "-m" in argv else argv
    flags = [arg.split("=", 1)[0] for arg in own if arg.startswith("--")]
    return [flag for flag in flags if flag not in known]
