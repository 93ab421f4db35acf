"""Benchmark cases. Every module here is imported by `t2i-bench`; each registers one or more cases
with `bench.core.register_case`. Add a file to add a case."""
