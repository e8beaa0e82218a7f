"""`strongroom bench`: one measured run, side by side with pgbench, written to JSON (+ PNG)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from strongroom.bench import generator as bench_generator
from strongroom.bench import report, runner


def bench(
    database_url: Annotated[str, typer.Option(help="PostgreSQL server to use (a fresh database is created)")] = (
        "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    ),
    clients: Annotated[int, typer.Option(help="Concurrent clients (and pgbench clients)")] = 32,
    duration: Annotated[float, typer.Option(help="Measured seconds, after the warm-up")] = 20.0,
    warmup: Annotated[float, typer.Option(help="Warm-up seconds")] = 5.0,
    workers: Annotated[int, typer.Option(help="API worker processes")] = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures here")] = None,
    plot_out: Annotated[Path | None, typer.Option("--plot", help="Write a PNG plot here")] = None,
    pgbench: Annotated[bool, typer.Option(help="Measure pgbench TPC-B in the same run")] = True,
    surge: Annotated[float, typer.Option(help="Also run an open-loop surge at this x the measured rate")] = 0.0,
    surge_duration: Annotated[float, typer.Option(help="Seconds of surge")] = 30.0,
    generator: Annotated[
        str, typer.Option(help="Load generator: auto (wrk when on PATH, else python), wrk (C, lightest) or python")
    ] = "auto",
    generator_processes: Annotated[
        int, typer.Option(help="The Python generator's processes (0: a quarter of the cores, at least 1)")
    ] = 0,
    scaling: Annotated[bool, typer.Option(help="Also measure 1/2/4 workers x 8/32/128 clients")] = False,
    half_load: Annotated[
        bool, typer.Option(help="Also measure latency open-loop at half the measured rate (the p99 target's point)")
    ] = False,
) -> None:
    """Payments per second and latency against PostgreSQL's own ceiling (pgbench TPC-B)."""
    if plot_out is not None:
        report.require_plotting()  # before the run, not after it
    try:
        chosen = bench_generator.resolve(generator)
    except (ValueError, bench_generator.GeneratorUnavailable) as exc:
        raise typer.BadParameter(str(exc), param_hint="--generator") from exc
    config = runner.BenchConfig(
        database_url, clients, duration, warmup, workers, generator=chosen, generator_processes=generator_processes
    )
    result = runner.run(config)
    samples = result.pop("_samples")
    wrk_plot = result.pop("_wrk_plot", None)
    tps = runner.pgbench_tps(database_url, clients, duration) if pgbench else None
    result["pgbench_tps"] = tps
    result["ratio"] = round(result["payments_per_s"] / tps, 3) if tps else None
    if surge:
        result["surge"] = runner.surge(config, result["payments_per_s"], factor=surge, surge_s=surge_duration)
    if half_load:
        result["half_load"] = _half_load(config, result["payments_per_s"])
        result["warnings"] += [f"half load: {w}" for w in result["half_load"].pop("warnings")]
    if scaling:
        result["scaling"] = _scaling(config)
        result["warnings"] += [w for row in result["scaling"] for w in row.pop("warnings")]
    _emit(result, json_out)
    for warning in result["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    if plot_out is not None and samples:
        report.plot(samples, plot_out, f"{workers} workers, {clients} clients")
    elif plot_out is not None and wrk_plot is not None:
        report.plot_wrk(
            wrk_plot["per_second"], wrk_plot["latency_cdf_us"], plot_out, f"{workers} workers, {clients} clients, wrk"
        )
    if result["double_charges"] or not result["processor_matches_ledger"]:
        raise typer.Exit(1)


def _emit(result: dict[str, Any], path: Path | None) -> None:
    text = json.dumps(result, indent=2, sort_keys=True)
    typer.echo(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def _half_load(config: runner.BenchConfig, max_per_s: float) -> dict[str, Any]:
    """Arrivals on a fixed schedule at half the closed-loop rate (the Python generator: wrk has no
    fixed-rate mode), so latency is measured where the server is not saturated."""
    rate = max_per_s / 2
    one = runner.run(dataclasses.replace(config, generator="python"), rate_per_s=rate)
    keep = (
        *("payments_per_s", "latency_ms", "errors", "double_charges", "processor_matches_ledger"),
        *("generator", "generator_cpu", "warnings"),
    )
    return {"offered_per_s": round(rate, 1), **{name: one[name] for name in keep}}


def _scaling(config: runner.BenchConfig) -> list[dict[str, Any]]:
    rows = []
    for workers in (1, 2, 4):
        for clients in (8, 32, 128):
            one = runner.run(dataclasses.replace(config, workers=workers, clients=clients))
            rows.append(
                {
                    "workers": workers,
                    "clients": clients,
                    "payments_per_s": one["payments_per_s"],
                    "p99_ms": one["latency_ms"]["p99"],
                    "errors": one["errors"],
                    "generator_cores": one["generator_cpu"]["cores"],
                    "warnings": [f"{workers} workers, {clients} clients: {w}" for w in one["warnings"]],
                }
            )
    return rows
