"""The benchmark report's arithmetic (no database)."""

from __future__ import annotations

from strongroom.bench import report


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert report.percentile(values, 50) == 50.0
    assert report.percentile(values, 99) == 99.0
    assert report.percentile(values, 100) == 100.0
    assert report.percentile([], 50) == 0.0
