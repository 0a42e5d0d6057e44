"""What the numbers mean: table schemas, the Parquet store, queries, phases, plots.

numpy / pyarrow / duckdb / matplotlib only (no torch, no ray), so results can be read
anywhere, fast.
"""
