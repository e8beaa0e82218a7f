"""The payments load benchmark (`strongroom bench`, `benchmarks/payments_load.py`)."""
