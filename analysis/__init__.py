"""What the numbers mean: table schemas, the Parquet store, queries, phases, plots.

numpy / pyarrow / duckdb / matplotlib only (no torch, no ray), so results can be read
anywhere, fast.
"""

from analysis import query

open = query.open_tables  # noqa: A001  `analysis.open(DIR)`: DuckDB views epochs, samples, trials

__all__ = ["open"]
