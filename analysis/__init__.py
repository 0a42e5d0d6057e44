"""What the numbers mean: table schemas, the Parquet store, queries, phases, plots.

numpy / pyarrow / duckdb / matplotlib only (no torch, no ray), so results can be read
anywhere, fast. DuckDB is imported only where a query runs: `analysis.open` loads it on first
use, so the training engine (which writes tables and detects phases) runs where DuckDB is not
installed, such as a GPU machine without a package registry.
"""

from __future__ import annotations

from typing import Any

__all__ = ["open"]


def __getattr__(name: str) -> Any:
    if name == "open":  # `analysis.open(DIR)`: DuckDB views epochs, samples, trials, evals
        from analysis.query import open_tables

        return open_tables
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
