"""Several data sets in one run: how many documents each gives an epoch of the mix, and which.

Counts come from `samples` (exact) or `weight` (a share of the weighted sets' documents, so a
3:1 weight gives 75 % / 25 % whatever the sets' sizes): a set needing more documents than it has
repeats its permutation, one needing fewer takes a seeded subset. The mixed documents are then
shuffled with the seed and packed; the global sample order over the packed rows (packing.py)
never depends on the world size, so resume and resharded resume work as with one set.
"""

from __future__ import annotations

import numpy as np

from launcher.runtime.data.core import DataError


def mix_counts(available: list[int], weights: list[float], samples: list[int]) -> list[int]:
    """Documents per set in one epoch of the mix."""
    if len(available) == 1 and not samples[0]:
        return list(available)
    by_weight = [i for i, s in enumerate(samples) if not s]
    pool = sum(available[i] for i in by_weight)
    total_weight = sum(weights[i] for i in by_weight)
    counts = list(samples)
    for i in by_weight:
        counts[i] = round(pool * weights[i] / total_weight)
    return counts


def pick(available: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices into `available` documents: whole permutations, then part of one."""
    if available == 0 and count > 0:
        raise DataError("data.datasets: a data set has no documents left after cleaning but is asked for some")
    repeats, rest = divmod(count, available) if available else (0, 0)
    parts = [rng.permutation(available) for _ in range(repeats)]
    parts.append(rng.permutation(available)[:rest])
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
