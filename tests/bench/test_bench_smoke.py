"""Smoke run of the payments benchmark (issue: figures come from `strongroom bench`, not tests):
a few seconds on PostgreSQL, asserting correctness only — never speed."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from strongroom.bench import generator, report, runner
from strongroom.cli import app

PG_URL = os.environ.get("STRONGROOM_TEST_DATABASE_URL")
# PostgreSQL only: without it the module is not collected (no skipped tests). The wrk tests need
# wrk, which .ci/run installs (as it does SoftHSM2 for the vault's tests).
PG_PARAMS = [PG_URL] if PG_URL else []
pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("database_url", PG_PARAMS)]
__test__ = bool(PG_PARAMS)


def test_default_run_without_wrk_uses_the_python_generator_charges_once_and_reports_its_cpu(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`strongroom bench` with no generator flag on a PATH without wrk: the Python generator, in
    two processes; the result names it, reports its CPU and a warning list (also on stderr)."""
    path = tmp_path / "bin"
    path.mkdir()
    (path / "pgbench").symlink_to(shutil.which("pgbench") or "pgbench")
    monkeypatch.setenv("PATH", f"{path}{os.pathsep}{Path(sys.executable).parent}")
    out, plot = tmp_path / "result.json", tmp_path / "plot.png"
    args = ["bench", "--database-url", database_url, "--clients", "4", "--duration", "2", "--warmup", "0.5"]
    args += ["--workers", "1", "--generator-processes", "2", "--json", str(out), "--plot", str(plot)]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    result = json.loads(out.read_text())
    assert result["generator"] == "python"
    assert result["succeeded"] > 0 and result["errors"] == {}
    assert result["double_charges"] == 0
    assert result["trial_balance_problems"] == 0 and result["ledger_captures"] == result["succeeded_payments"]
    assert result["processor_charges"] == result["succeeded_payments"]
    assert result["pgbench_tps"] > 0 and result["ratio"] > 0
    # Both processes' CPU in the measured window, and the run's own CPU beside it.
    figures, used = result["generator_cpu"], result["cpu_ms_per_payment"]
    assert figures["processes"] == 2 and figures["cores"] > 0
    assert used["server"] > 0 and used["postgres"] > 0 and used["generator"] > 0
    assert figures["share_of_run"] == pytest.approx(
        used["generator"] / (used["server"] + used["postgres"] + used["generator"]), abs=0.002
    )
    assert isinstance(result["warnings"], list)
    assert ("warning: " in run.stderr) == bool(result["warnings"])
    assert plot.stat().st_size > 1000


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
    """A few seconds with one worker and 4 clients, wrk chosen as the default chooses it (wrk is on
    PATH here): a smoke run, not a measurement."""
    return runner.BenchConfig(
        database_url,
        clients=4,
        duration_s=2.0,
        warmup_s=1.0,
        workers=1,
        payment_methods=4,
        data_dir=tmp_path,
        generator="auto",
    )


def test_wrk_generator_smoke_run_charges_exactly_once(database_url: str, tmp_path: Path) -> None:
    config = _small_wrk_run(database_url, tmp_path)
    result = runner.run(config)
    assert result["generator"] == "wrk"
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
    # wrk's own CPU in its run: a small share of the run's, well under its two threads' worth.
    assert 0 < result["generator_cpu"]["share_of_run"] < generator.SHARE_MAX
    assert 0 < result["generator_cpu"]["cores"] < generator.SATURATED_FRACTION * result["generator_cpu"]["cores_usable"]
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
