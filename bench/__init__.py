"""Benchmarks: learning quality under heterogeneity and system cost, side by side.

`python -m bench --suite quick|skew|full` (or `make bench-quick` / `make bench`)
writes results/bench/<suite>.json, <suite>.md and PNG plots; docs/RESULTS.md documents
the JSON schema. Every registered strategy (strategies.STRATEGIES) is benchmarked.
"""
