"""Smoke run of the payments benchmark (issue: figures come from `strongroom bench`, not tests):
a few seconds on PostgreSQL, asserting correctness only — never speed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from strongroom.bench import report, runner

PG_URL = os.environ.get("STRONGROOM_TEST_DATABASE_URL")
# PostgreSQL only: without it the module is not collected (no skipped tests). The wrk tests need
# wrk, which .ci/run installs (as it does SoftHSM2 for the vault's tests).
PG_PARAMS = [PG_URL] if PG_URL else []
pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("database_url", PG_PARAMS)]
__test__ = bool(PG_PARAMS)


def test_benchmark_smoke_run_charges_exactly_once_per_succeeded_payment(database_url: str, tmp_path: Path) -> None:
    config = runner.BenchConfig(
        database_url, clients=4, duration_s=2.0, warmup_s=0.5, workers=1, payment_methods=4, data_dir=tmp_path
    )
    result = runner.run(config)
    samples = result.pop("_samples")
    assert result["succeeded"] > 0
    assert result["errors"] == {}
    assert result["double_charges"] == 0
    assert result["trial_balance_problems"] == 0 and result["ledger_captures"] == result["succeeded_payments"]
    assert result["processor_charges"] == result["succeeded_payments"]
    report.plot(samples, tmp_path / "plot.png", "smoke")
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert runner.pgbench_tps(database_url, 2, 1) > 0


def test_surge_smoke_sheds_or_serves_everything_and_charges_once(database_url: str, tmp_path: Path) -> None:
    config = runner.BenchConfig(
        database_url, clients=4, duration_s=2.0, warmup_s=0.5, workers=1, payment_methods=4, data_dir=tmp_path
    )
    result = runner.surge(config, sustainable_per_s=20, factor=5, surge_s=2.0)
    surge = result["surge"]
    assert surge["requests"] > 0
    # Every surge request got an answer: served, or shed with Retry-After; nothing else.
    assert set(surge["errors"]) <= {"http_503", "http_429", "not_sent"}
    assert surge["shed"] == surge["shed_with_retry_after"]
    assert surge["accepted"] + surge["shed"] + surge["not_sent_generator_limit"] == surge["requests"]
    assert result["after"]["succeeded"] > 0
    assert result["double_charges"] == 0
    assert result["trial_balance_problems"] == 0 and result["ledger_captures"] == result["succeeded_payments"]
    assert result["processor_charges"] == result["succeeded_payments"]


def _small_wrk_run(database_url: str, tmp_path: Path) -> runner.BenchConfig:
    """A few seconds of wrk with one worker and 4 clients: a smoke run, not a measurement."""
    return runner.BenchConfig(
        database_url,
        clients=4,
        duration_s=2.0,
        warmup_s=1.0,
        workers=1,
        payment_methods=4,
        data_dir=tmp_path,
        generator="wrk",
    )


def test_wrk_generator_smoke_run_charges_exactly_once(database_url: str, tmp_path: Path) -> None:
    config = _small_wrk_run(database_url, tmp_path)
    result = runner.run(config)
    assert result["succeeded"] > 0
    assert result["errors"] == {}
    assert result["double_charges"] == 0
    assert result["trial_balance_problems"] == 0 and result["ledger_captures"] == result["succeeded_payments"]
    # warm-up and measured payments all reached the processor exactly once
    assert result["processor_charges"] == result["succeeded_payments"] >= result["succeeded"]
    # Where the time went, a payment: the server's workers, PostgreSQL (on this machine, as in CI),
    # wrk; the machine's busy time covers them all.
    used = result["cpu_ms_per_payment"]
    assert used["server"] > 0 and used["postgres"] > 0 and used["generator"] > 0
    assert used["machine_busy"] >= 0.9 * (used["server"] + used["postgres"] + used["generator"])
    # The plot's data: payments per whole second of the run read back from the database (at
    # most wrk's count, give or take the requests in flight when it began), and wrk's latency
    # percentiles up to the maximum.
    plotted = result["_wrk_plot"]
    assert len(plotted["per_second"]) == 2 and all(n > 0 for n in plotted["per_second"])
    assert sum(plotted["per_second"]) <= result["succeeded"] + config.clients
    percentile, top_us = plotted["latency_cdf_us"][-1]
    assert percentile == 100 and abs(top_us / 1000 - result["latency_ms"]["max"]) <= 0.01
    report.plot_wrk(plotted["per_second"], plotted["latency_cdf_us"], tmp_path / "wrk.png", "smoke")
    assert (tmp_path / "wrk.png").stat().st_size > 1000


def test_wrk_surge_smoke_recovers_with_wrk_closed_loops_around_the_open_loop(database_url: str, tmp_path: Path) -> None:
    """With the wrk generator the closed loops before and after the surge are wrk's; the surge is
    still the open loop (wrk has no fixed rate). The same guarantees: every surge request served
    or shed with Retry-After, nothing charged twice, and the rate after the surge is served."""
    config = _small_wrk_run(database_url, tmp_path)
    result = runner.surge(config, sustainable_per_s=20, factor=5, surge_s=2.0)
    surge = result["surge"]
    assert set(surge["errors"]) <= {"http_503", "http_429", "not_sent"}
    assert surge["shed"] == surge["shed_with_retry_after"]
    assert surge["accepted"] + surge["shed"] + surge["not_sent_generator_limit"] == surge["requests"] > 0
    assert result["before"]["generator"] == result["after"]["generator"] == "wrk"
    assert result["before"]["succeeded"] > 0 and result["after"]["succeeded"] > 0
    assert result["before"]["errors"] == result["after"]["errors"] == {}
    assert result["double_charges"] == 0 and result["processor_matches_ledger"]
