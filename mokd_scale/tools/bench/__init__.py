"""`mokd-bench step|memory|data`: the benchmarks (main.py dispatches to step.py, memory.py, data.py)."""
