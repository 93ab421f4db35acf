"""t2i-bench: timing and profiling of t2i's hot loops (see bench/core.py and bench/cases/)."""
