"""Side-by-side timing for the benchmarks: contestants take turns (A B C, A B C, ...), so a slowdown of
the shared machine in the middle of a run hits all of them alike instead of whichever ran then."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(contestants: dict[str, Callable[[], object]], rounds: int, warmup: int = 2,
                        ) -> dict[str, float]:
    """Median seconds of one call of each contestant over `rounds` interleaved rounds, after `warmup` rounds."""
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for round_index in range(warmup + rounds):
        for name, run in contestants.items():
            start = time.perf_counter()
            run()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
