"""dcp_native benchmark suite (driven by benchmarks/run.py)."""
