"""Developer tooling: benchmarks, profiling, the mock stack the tests and `tools/render.py` evaluate the
program with, and the pull-request workflow's render diff and policy check. What users run is in tools/."""
