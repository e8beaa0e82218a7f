"""Which load generator a benchmark uses, and the warning when it, not the server, set the rate
(no database: the choice from PATH, the clients dealt to processes, the decision on figures)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from strongroom.bench import generator, load


def _bin(tmp_path: Path, *names: str) -> str:
    """A directory holding executables of these names, for use as PATH."""
    directory = tmp_path / "bin"
    directory.mkdir()
    for name in names:
        exe = directory / name
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    return str(directory)


def test_auto_picks_wrk_when_it_is_on_path(tmp_path: Path) -> None:
    assert generator.resolve("auto", path=_bin(tmp_path, "wrk")) == "wrk"


def test_auto_picks_the_python_generator_when_path_lacks_wrk(tmp_path: Path) -> None:
    assert generator.resolve("auto", path=_bin(tmp_path, "pgbench")) == "python"


def test_wrk_asked_for_by_name_and_missing_is_an_error_not_a_substitute(tmp_path: Path) -> None:
    with pytest.raises(generator.GeneratorUnavailable, match="wrk is not on PATH"):
        generator.resolve("wrk", path=_bin(tmp_path))


def test_explicit_python_is_kept_even_with_wrk_present_and_the_former_name_still_works(tmp_path: Path) -> None:
    path = _bin(tmp_path, "wrk")
    assert generator.resolve("python", path=path) == "python"
    assert generator.resolve("httpx", path=path) == "python"
    with pytest.raises(ValueError, match="unknown generator 'ab'"):
        generator.resolve("ab", path=path)


def test_closed_loop_clients_are_dealt_to_the_processes_and_an_open_loop_keeps_one() -> None:
    spec = load.LoadSpec("http://127.0.0.1:1", "sk_test_x", ("pm_1",), clients=5, warmup_s=0, duration_s=1)
    shares = generator.shares(spec, 2)
    assert [(s.clients, s.first_n) for s in shares] == [(3, 0), (2, 3)]
    assert [s.clients for s in generator.shares(spec, 8)] == [1, 1, 1, 1, 1]  # never a process with none
    open_loop = load.LoadSpec("http://127.0.0.1:1", "sk_test_x", ("pm_1",), 512, 0, 1, rate_per_s=100)
    assert generator.shares(open_loop, 4) == [open_loop]


# Figures as a run measures them (cpu_ms_per_payment): wrk's are from a run on the 2-core machine.
_WRK_RUN = {"server": 1.253, "postgres": 0.548, "generator": 0.062, "machine_busy": 5.094, "machine_idle": 0.016}


def test_a_generator_using_nearly_all_the_cores_it_can_use_is_reported_as_the_limit() -> None:
    """One Python process busy 19 s of a 20 s window: its own ceiling, whatever the server can do."""
    verdict = generator.assess("python", 1, cpu_s=19.0, window_s=20.0, used={})
    assert verdict["generator"] == "python"
    assert verdict["generator_cpu"] == {"cores": 0.95, "cores_usable": 1}
    assert len(verdict["warnings"]) == 1 and "limited the rate" in verdict["warnings"][0]
    # The same process at a fifth of a core left the server to set the rate.
    assert generator.assess("python", 1, cpu_s=4.0, window_s=20.0, used={})["warnings"] == []


def test_a_generator_taking_a_large_share_of_a_saturated_machine_is_reported() -> None:
    heavy = {**_WRK_RUN, "generator": 0.6, "machine_busy": 2.5, "machine_idle": 0.01}
    verdict = generator.assess("python", 1, cpu_s=4.0, window_s=20.0, used=heavy)
    assert verdict["generator_cpu"]["share_of_run"] == pytest.approx(0.25, abs=0.001)
    assert len(verdict["warnings"]) == 1 and "understates" in verdict["warnings"][0]
    # With the machine half idle, the generator's CPU was not taken from the server.
    idle = {**heavy, "machine_idle": 2.5}
    assert generator.assess("python", 1, cpu_s=4.0, window_s=20.0, used=idle)["warnings"] == []


def test_wrk_on_the_measured_run_is_not_the_limit() -> None:
    verdict = generator.assess("wrk", 2, cpu_s=0.06, window_s=20.0, used=_WRK_RUN)
    assert verdict["warnings"] == []
    assert verdict["generator_cpu"]["share_of_run"] == pytest.approx(0.062 / 1.863, abs=0.001)
    assert verdict["generator_cpu"]["cores_usable"] == min(2, os.cpu_count() or 1)
