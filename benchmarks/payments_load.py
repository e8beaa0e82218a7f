"""Payments load benchmark, runnable alone:

    python benchmarks/payments_load.py --clients 32 --duration 20 --json out.json

Same options as `strongroom bench` (see src/strongroom/bench/).
"""

import typer

from strongroom.bench.cli import bench

if __name__ == "__main__":
    typer.run(bench)
