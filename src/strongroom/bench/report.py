"""Figures from samples: throughput, latency percentiles, errors by kind, and a PNG plot."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from strongroom import extras
from strongroom.bench.load import Sample


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def summarize(samples: list[Sample], duration_s: float) -> dict[str, Any]:
    ok = sorted(s.latency_ms for s in samples if s.outcome == "ok")
    outcomes = Counter(s.outcome for s in samples if s.outcome != "ok")
    return {
        "requests": len(samples),
        "succeeded": len(ok),
        "payments_per_s": round(len(ok) / duration_s, 1) if duration_s else 0.0,
        "latency_ms": {
            "p50": round(percentile(ok, 50), 2),
            "p95": round(percentile(ok, 95), 2),
            "p99": round(percentile(ok, 99), 2),
            "max": round(ok[-1], 2) if ok else 0.0,
        },
        "errors": dict(outcomes),
        "shed_with_retry_after": sum(1 for s in samples if s.outcome in ("http_429", "http_503") and s.retry_after),
    }


def per_second(samples: list[Sample]) -> list[int]:
    if not samples:
        return []
    buckets = [0] * (int(max(s.finished_s for s in samples)) + 1)
    for s in samples:
        if s.outcome == "ok" and s.finished_s >= 0:
            buckets[int(s.finished_s)] += 1
    return buckets


def require_plotting() -> Any:
    """matplotlib, or an error naming the extra that installs it."""
    return extras.require("matplotlib", extra="bench", feature="strongroom bench --plot")


def plot(samples: list[Sample], path: Path, title: str) -> None:
    matplotlib = require_plotting()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series = per_second(samples)
    left.plot(range(len(series)), series)
    left.set_xlabel("second")
    left.set_ylabel("payments/s")
    left.set_ylim(bottom=0)  # from zero: a dip of a few percent must not look like a collapse
    left.set_title("throughput")
    latencies = [s.latency_ms for s in samples if s.outcome == "ok"]
    right.hist(latencies, bins=50)
    right.set_xlabel("latency (ms)")
    right.set_ylabel("payments")
    right.set_title("latency distribution")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_wrk(per_second_ok: list[int], latency_cdf_us: list[list[float]], path: Path, title: str) -> None:
    """`plot` for a wrk run: throughput per second (from the database) and the latency
    distribution as wrk's percentiles (it keeps no per-request samples)."""
    matplotlib = require_plotting()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(range(len(per_second_ok)), per_second_ok)
    left.set_xlabel("second")
    left.set_ylabel("payments/s")
    left.set_ylim(bottom=0)  # from zero: a dip of a few percent must not look like a collapse
    left.set_title("throughput")
    right.plot([us / 1000 for _, us in latency_cdf_us], [p for p, _ in latency_cdf_us])
    right.set_xlabel("latency (ms)")
    right.set_ylabel("percentile")
    right.set_title("latency distribution (cumulative)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
