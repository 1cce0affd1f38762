"""The benchmark suites (`pytest benchmarks --benchmark`) and their shared machinery (_bench.py)."""
